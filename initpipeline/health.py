"""Readiness and public warm-up progress, in the application/health+json shape."""

from __future__ import annotations

import json
from typing import Any

from . import storage
from .conf import settings
from .exceptions import ArtifactNotReady
from .loading import active
from .models import PhaseState
from .registry import get_pipeline
from .reporting import NO_RUN_PUBLIC, latest_run_report


def required_artifacts() -> list[str]:
    return list(settings.REQUIRED_ARTIFACTS or get_pipeline().artifact_names())


def missing_artifacts(names: list[str]) -> list[str]:
    """Which of ``names`` the active generation lacks, as this process sees it (throttled)."""
    try:
        records = active.snapshot().records
        missing = [n for n in names if n not in records]
        if missing:
            # Not ready is the transient state worth noticing soon: look again after a
            # fraction of a second (not_ready_interval) rather than up to
            # REFRESH_INTERVAL later, and not once per request. Once ready, it is free.
            records = active.recent().records
    except ArtifactNotReady:
        return list(names)
    return [n for n in names if n not in records]


def corrupt_artifacts(names: list[str]) -> dict[str, str]:
    """Artifacts of ``names`` whose file is known to be bad on this host: found corrupt by
    this process, or missing, or changed since this host verified it (a stat each)."""
    try:
        records = active.snapshot().records
    except ArtifactNotReady:
        return {}
    found = {}
    for name in names:
        rec = records.get(name)
        if rec is None:
            continue
        reason = active.corrupt.get(rec.sha256) or storage.problem(rec.as_artifact())
        if reason:
            found[name] = reason
    return found


def _phase_status(state: str) -> str:
    if state in (PhaseState.SUCCEEDED, PhaseState.CACHED):
        return "pass"
    if state in (PhaseState.FAILED, PhaseState.UPSTREAM_FAILED, PhaseState.CANCELLED):
        return "fail"
    return "warn"


def public_progress() -> dict[str, Any]:
    """Progress anyone may see: phase names, states and fractions; no messages or errors.

    Read from the database at most every ``not_ready_interval()`` per process (the
    warming-up page and /init/readyz show it to every visitor of the warm-up).
    """

    def build() -> dict[str, Any]:
        report = latest_run_report()
        return NO_RUN_PUBLIC if report is None else report.public()

    return active.progress(build)


#: (artifact, missing, corrupt) -> (the progress it shows, the encoded body): see
#: readiness_json().
_bodies: dict[tuple[Any, ...], tuple[dict[str, Any], bytes]] = {}


def readiness_json(artifact_name: str | None = None) -> tuple[bytes, bool]:
    """readiness(), encoded; a not-ready body is encoded once per look at the progress
    (public_progress), not once per probe."""
    names = [artifact_name] if artifact_name else required_artifacts()
    missing = missing_artifacts(names)
    corrupt = corrupt_artifacts(names)
    if not missing and not corrupt:
        body, ready = _readiness(names, missing, corrupt)
        return json.dumps(body).encode(), ready
    key = (tuple(names), tuple(missing), tuple(sorted(corrupt.items())))
    progress = public_progress()
    cached = _bodies.get(key)
    if cached is not None and cached[0] is progress:
        return cached[1], False
    body, ready = _readiness(names, missing, corrupt, progress)
    encoded = json.dumps(body).encode()
    _bodies[key] = (progress, encoded)
    return encoded, ready


def readiness(artifact_name: str | None = None) -> tuple[dict[str, Any], bool]:
    """The body of /init/readyz and whether the required artifacts are active and sound.

    When ready, it answers from this process's cached view of the active generation: no
    query, so probes stay cheap. When not, it adds a check per phase with its progress.
    """
    names = [artifact_name] if artifact_name else required_artifacts()
    return _readiness(names, missing_artifacts(names), corrupt_artifacts(names))


def _readiness(
    names: list[str],
    missing: list[str],
    corrupt: dict[str, str],
    progress: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    checks: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        status = "fail" if name in missing or name in corrupt else "pass"
        entry: dict[str, Any] = {"componentType": "artifact", "status": status}
        if name in corrupt:
            # The reason names files and checksums: for the logs and staff, not for probes.
            entry["output"] = "its file failed its check; run start_init to rebuild it"
        elif name in missing:
            entry["output"] = "not active yet"
        checks[f"artifact:{name}"] = [entry]
    ready = not missing and not corrupt
    if not ready:
        for phase in (progress or public_progress())["phases"]:
            checks[f"phase:{phase['name']}"] = [
                {
                    "componentType": "phase",
                    "status": _phase_status(phase["state"]),
                    "observedValue": phase["progress"],
                    "observedUnit": "ratio",
                }
            ]
    if ready:
        description = "artifacts ready"
    elif corrupt:
        description = f"corrupt: {', '.join(corrupt)}"
    else:
        description = f"warming up: waiting for {', '.join(missing)}"
    return {"status": "pass" if ready else "fail", "description": description, "checks": checks}, (
        ready
    )
