"""initpipeline: slow Django start-up as a Celery pipeline of init phases."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .exceptions import (
    ArtifactCorrupt,
    ArtifactNotReady,
    ArtifactSignatureError,
    InitPipelineError,
    PhaseCancelled,
    PipelineConfigError,
)
from .registry import F
from .registry import registry as _registry

if TYPE_CHECKING:
    from .context import PhaseContext

__version__ = "0.1.0"


def phase(
    *,
    produces: str | Sequence[str] | None = None,
    after: str | Sequence[str] = (),
    inputs: str | Sequence[str] = (),
    version: str | int = "1",
    timeout: int | None = None,
    retries: int = 0,
    config: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    name: str | None = None,
) -> Callable[[F], F]:
    """Register a function as an init phase.

    ::

        @phase(produces="lsa", after=["collect"], version="3", timeout=3600, retries=2)
        def build_index(ctx): ...

    produces   artifact name(s) the phase saves, each exactly once (required)
    after      phase name(s) that must succeed first
    inputs     artifact name(s) it loads; their producers become dependencies
    version    bump it when the code changes: the phase and its dependants re-run
    timeout    seconds: Celery soft limit (hard limit 30 s later); default DEFAULT_TIMEOUT
    retries    extra attempts after a failure, with exponential backoff and jitter
    config     dict (or a callable returning one) of JSON values; part of the fingerprint
    name       the phase's name; defaults to the function's name

    Phases live in an ``init_phases`` module of an installed app and must be safe to run
    twice (a redelivered task may run one again).
    """
    return _registry.phase(
        produces=produces,
        after=after,
        inputs=inputs,
        version=version,
        timeout=timeout,
        retries=retries,
        config=config,
        name=name,
    )


__all__ = [
    "ArtifactCorrupt",
    "ArtifactNotReady",
    "ArtifactSignatureError",
    "InitPipelineError",
    "PhaseCancelled",
    "PhaseContext",
    "PipelineConfigError",
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
