"""Readiness: which required artifacts are active, in the application/health+json shape."""

from __future__ import annotations

from typing import Any

from . import conf, services
from .models import PhaseState
from .registry import get_pipeline


def readiness(artifact_name: str | None = None) -> tuple[dict[str, Any], bool]:
    pipeline = get_pipeline()
    required = (
        [artifact_name]
        if artifact_name
        else list(conf.get("REQUIRED_ARTIFACTS") or pipeline.artifact_names())
    )
    active = services.active_generation()
    have = active.artifact_map() if active is not None else {}
    missing = [n for n in required if n not in have]
    ready = not missing
    data = services.status()
    checks: dict[str, list[dict[str, Any]]] = {}
    run = data["run"]
    for ph in run["phases"] if run else []:
        state = ph["state"]
        checks[f"phase:{ph['name']}"] = [
            {
                "status": "pass"
                if state in (PhaseState.SUCCEEDED, PhaseState.CACHED)
                else "fail"
                if state in (PhaseState.FAILED, PhaseState.UPSTREAM_FAILED)
                else "warn",
                "observedValue": ph["progress"],
                "observedUnit": "ratio",
                "output": ph["message"],
            }
        ]
    body = {
        "status": "pass" if ready else "fail",
        "description": "artifacts ready" if ready else f"waiting for {', '.join(missing)}",
        "checks": checks,
    }
    return body, ready
