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


class UnknownDigest(ArtifactCorrupt):
    """The artifact's digest names an algorithm this release does not know (or is not a
    digest): this host cannot verify it, and says so without marking the artifact."""


class ArtifactLoadError(InitPipelineError):
    """The loader or the warm-up of an artifact handle raised (the cause is attached)."""


class PhaseCancelled(InitPipelineError):
    """Raised inside a phase (at its next progress or heartbeat call) when its run is cancelled."""


class PhaseHandedOff(InitPipelineError):
    """Raised inside a phase (at its next progress or heartbeat call) when its worker is
    shutting down: the phase goes back to the queue and resumes from its checkpoint."""


class EnqueueError(InitPipelineError):
    """The broker refused the run's tasks; the run is marked failed."""


# -- control flow between a phase task and the code that runs it (execution.py) -----------


class RetryPhase(InitPipelineError):
    """The phase failed and has attempts left: the task re-sends itself after ``countdown``."""

    def __init__(self, countdown: float) -> None:
        super().__init__(countdown)
        self.countdown = countdown


class PhaseFailed(InitPipelineError):
    """The phase failed for good: the chain stops here (the failure is already recorded)."""


class PhaseSkipped(InitPipelineError):
    """This copy of the task must not run (duplicate delivery, run no longer in flight)."""
