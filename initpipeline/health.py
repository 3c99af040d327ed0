"""Readiness and public warm-up progress, in the application/health+json shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import digests, storage
from .exceptions import ArtifactNotReady
from .loading import active
from .models import PhaseState
from .registry import required_artifacts
from .reporting import NO_RUN_PUBLIC, latest_run_report
from .serving import repository


def missing_artifacts(names: list[str]) -> list[str]:
    """Which of ``names`` a request of this process cannot be served yet: in a process
    that serves in the background, those not loaded; elsewhere, those the active
    generation lacks, as this process sees it (throttled)."""
    repo = repository()
    if repo is not None:
        return repo.missing(names)
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
        reason = active.corrupt.get(rec.digest) or storage.problem(rec.as_artifact())
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


@dataclass(frozen=True)
class ArtifactCheck:
    """One artifact's part of the readiness: pass, warn (serves, with a concern) or fail."""

    name: str
    status: str
    #: What a probe may read (no file names, checksums or errors: those are for staff).
    output: str | None = None


CORRUPT_OUTPUT = "its file failed its check; run start_init to rebuild it"
#: A pickle whose signature this host's keys do not verify: the host's problem (its
#: SECRET_KEY), not the artifact's; start_init elsewhere does not rebuild it.
UNSIGNED_OUTPUT = "its signature does not verify with this host's SECRET_KEY; see the logs"


#: A digest of an algorithm this release does not know: this host must be upgraded.
UNKNOWN_DIGEST_OUTPUT = "this release cannot verify its digest; upgrade initpipeline here"


def _bad_file(reason: str) -> str:
    """The output of an artifact check whose file is known bad on this host."""
    if storage.NO_VALID_SIGNATURE in reason:
        return UNSIGNED_OUTPUT
    if digests.UNKNOWN_ALGORITHM in reason:
        return UNKNOWN_DIGEST_OUTPUT
    return CORRUPT_OUTPUT


def artifact_checks(names: list[str]) -> list[ArtifactCheck]:
    """Whether this process (and, under Gunicorn, every worker of its server) can serve
    each of ``names`` now, without waiting for a load."""
    repo = repository()
    if repo is None:
        # Not serving in the background (a shell, runserver, a test): the active
        # generation has the artifact and its file is sound; the first use loads it.
        missing = missing_artifacts(names)
        corrupt = corrupt_artifacts(names)
        return [
            ArtifactCheck(n, "fail", _bad_file(corrupt[n]))
            if n in corrupt
            else ArtifactCheck(n, "fail", "not active yet")
            if n in missing
            else ArtifactCheck(n, "pass")
            for n in names
        ]
    served = repo.current.loaded
    records = active.peek().records
    folder = repo.server_folder
    lacking: dict[int, list[str]] = {}
    if folder is not None and all(n in served for n in names):
        lacking = folder.missing(names, pid=repo.pid)
    checks = []
    for name in names:
        loaded = served.get(name)
        if loaded is None:
            failure = repo.failures.get(name)
            if name in repo.progress.loading:
                output = "loading"
            elif failure is not None:
                output = "its load failed; it is tried again (see the logs)"
            elif name not in records:
                output = "not active yet"
            else:
                output = "loading"
            checks.append(ArtifactCheck(name, "fail", output))
            continue
        reason = active.corrupt.get(loaded.digest) or storage.problem(loaded.record.as_artifact())
        if reason:
            checks.append(ArtifactCheck(name, "fail", _bad_file(reason)))
            continue
        others = sorted(pid for pid, names_ in lacking.items() if name in names_)
        if others:
            checks.append(
                ArtifactCheck(
                    name,
                    "fail",
                    f"not loaded yet by worker{'s' if len(others) > 1 else ''} "
                    f"{', '.join(map(str, others))} of this server",
                )
            )
            continue
        newer = records.get(name)
        if newer is None or newer.digest == loaded.digest:
            checks.append(ArtifactCheck(name, "pass"))
            continue
        failure = repo.failures.get(name)
        serving = f"serving generation {loaded.generation_id}"
        if failure is not None and failure.digest == newer.digest:
            output = f"{serving}; the active generation's failed to load (see the logs)"
            checks.append(ArtifactCheck(name, "warn", output))
        else:
            checks.append(ArtifactCheck(name, "pass", f"{serving}; loading a newer one"))
    return checks


#: (artifact checks) -> (the progress it shows, the encoded body): see readiness_json().
_bodies: dict[tuple[Any, ...], tuple[dict[str, Any], bytes]] = {}


def readiness_json(artifact_name: str | None = None) -> tuple[bytes, bool]:
    """readiness(), encoded; a not-ready body is encoded once per look at the progress
    (public_progress), not once per probe."""
    names = [artifact_name] if artifact_name else required_artifacts()
    checks = artifact_checks(names)
    if all(c.status != "fail" for c in checks):
        body, ready = _readiness(checks)
        return json.dumps(body).encode(), ready
    key = tuple(checks)
    progress = public_progress()
    cached = _bodies.get(key)
    if cached is not None and cached[0] is progress:
        return cached[1], False
    body, ready = _readiness(checks, progress)
    encoded = json.dumps(body).encode()
    _bodies[key] = (progress, encoded)
    return encoded, ready


def readiness(artifact_name: str | None = None) -> tuple[dict[str, Any], bool]:
    """The body of /init/readyz and whether the process can serve the required artifacts.

    In a process that serves in the background: each is loaded (and warmed) here, its file
    is sound, and every other worker of its Gunicorn server that takes connections has
    loaded it too. Elsewhere: the active generation has each, with a sound file.
    When ready, it costs no query, so probes stay cheap. When not, it adds a check per
    phase with its progress.
    """
    names = [artifact_name] if artifact_name else required_artifacts()
    return _readiness(artifact_checks(names))


def _readiness(
    artifacts: list[ArtifactCheck], progress: dict[str, Any] | None = None
) -> tuple[dict[str, Any], bool]:
    checks: dict[str, list[dict[str, Any]]] = {}
    for check in artifacts:
        entry: dict[str, Any] = {"componentType": "artifact", "status": check.status}
        if check.output:
            entry["output"] = check.output
        checks[f"artifact:{check.name}"] = [entry]
    failing = [c for c in artifacts if c.status == "fail"]
    warning = [c for c in artifacts if c.status == "warn"]
    ready = not failing
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
    corrupt = [c.name for c in failing if c.output == CORRUPT_OUTPUT]
    here = [c.name for c in failing if c.output in (UNSIGNED_OUTPUT, UNKNOWN_DIGEST_OUTPUT)]
    if corrupt:
        description = f"corrupt: {', '.join(corrupt)}"
    elif here:
        description = f"cannot be verified on this host: {', '.join(here)}"
    elif failing:
        description = f"warming up: waiting for {', '.join(c.name for c in failing)}"
    elif warning:
        description = (
            f"serving; a newer generation failed to load: {', '.join(c.name for c in warning)}"
        )
    else:
        description = "artifacts ready"
    status = "fail" if failing else "warn" if warning else "pass"
    return {"status": status, "description": description, "checks": checks}, ready
