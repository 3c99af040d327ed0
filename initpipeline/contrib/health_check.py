"""A django-health-check 4.x check: ``initpipeline.contrib.health_check.InitPipelineReady``."""

from __future__ import annotations

import dataclasses

from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable

from ..health import readiness


@dataclasses.dataclass
class InitPipelineReady(HealthCheck):  # type: ignore[misc]
    """Unavailable until the required artifacts are active and sound (same rule as /init/readyz).

    Add ``"initpipeline.contrib.health_check.InitPipelineReady"`` to the ``checks`` of your
    ``HealthCheckView``; ``artifact`` narrows it to one artifact.
    """

    artifact: str | None = None

    def run(self) -> None:  # type: ignore[override]
        body, ready = readiness(self.artifact)
        if not ready:
            raise ServiceUnavailable(body["description"])
