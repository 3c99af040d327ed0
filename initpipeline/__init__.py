"""initpipeline: slow Django start-up as a Celery pipeline of init phases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .exceptions import (
    ArtifactCorrupt,
    ArtifactLoadError,
    ArtifactNotReady,
    ArtifactSignatureError,
    InitPipelineError,
    PhaseCancelled,
    PipelineConfigError,
    UnknownDigest,
)
from .registry import registry as _registry

if TYPE_CHECKING:
    from .context import PhaseContext

__version__ = "0.1.0"


# @phase(...): registers into the project-wide registry; see Registry.phase for the arguments.
phase = _registry.phase

__all__ = [
    "ArtifactCorrupt",
    "ArtifactLoadError",
    "ArtifactNotReady",
    "ArtifactSignatureError",
    "InitPipelineError",
    "PhaseCancelled",
    "PhaseContext",
    "PipelineConfigError",
    "UnknownDigest",
    "artifact",
    "phase",
    "requires_artifacts",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing initpipeline (from settings or init_phases) must not import
    # Django models or views before the app registry is ready.
    if name == "artifact":
        from .loading import artifact

        return artifact
    if name == "requires_artifacts":
        from .decorators import requires_artifacts

        return requires_artifacts
    if name == "PhaseContext":
        from .context import PhaseContext

        return PhaseContext
    raise AttributeError(name)
