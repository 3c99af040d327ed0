"""Every error initpipeline raises derives from InitPipelineError."""

from __future__ import annotations


class InitPipelineError(Exception):
    """Base class of initpipeline's own errors."""


class PipelineConfigError(InitPipelineError):
    """The pipeline or the settings are wrong (unknown phase, cycle, bad option...)."""


class ArtifactNotReady(InitPipelineError):
    """The artifact has not been produced yet, or no generation is active."""


class ArtifactCorrupt(InitPipelineError):
    """The stored file does not match the checksum recorded when it was published."""


class ArtifactSignatureError(ArtifactCorrupt):
    """A pickle artifact has no valid signature; it is refused before unpickling."""


class PhaseCancelled(InitPipelineError):
    """Raised inside a phase (at its next progress or heartbeat call) when its run is cancelled."""


class EnqueueError(InitPipelineError):
    """The broker refused the run's tasks; the run is marked failed."""
