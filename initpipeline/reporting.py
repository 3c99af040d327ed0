"""One typed report of the init's state, built from the records once, rendered everywhere.

``init_status`` (text and JSON), ``/init/status.json``, the admin pages, the warming-up
page and ``/init/readyz`` all read a report from here; formatters.py turns one into text.
Building a report never writes (web reads poll it every second).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from django.utils import timezone

from . import history, storage
from .exceptions import PipelineConfigError
from .models import (
    PHASE_DONE,
    Artifact,
    Generation,
    PhaseRun,
    PhaseState,
    PipelineRun,
    RunState,
    WebProcess,
)
from .registry import required_artifacts
from .servers import REPORT_STALE

READY = "ready"
NOT_READY = "not_ready"
FAILED = "failed"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class PhaseReport:
    """One phase of a run, as its record says."""

    name: str
    state: str
    reason: str
    progress: float
    message: str
    attempt: int
    max_attempts: int
    losses: int
    max_losses: int
    handoffs: int
    checkpoint_at: str | None
    timeout: int | None
    started_at: datetime | None
    finished_at: datetime | None
    duration: float | None
    error: str
    traceback: str
    depends_on: list[str]
    worker: str = ""
    #: A shard's index; None for a phase's own row.
    shard_index: int | None = None
    #: A sharded phase's shards (its progress is theirs and its merge's); None otherwise.
    shards: list[PhaseReport] | None = None

    @classmethod
    def of(cls, pr: PhaseRun) -> PhaseReport:
        return cls(
            name=pr.name,
            state=pr.state,
            reason=pr.reason,
            progress=pr.progress,
            message=pr.message,
            attempt=pr.attempt,
            max_attempts=pr.max_attempts,
            losses=pr.losses,
            max_losses=pr.max_losses,
            handoffs=pr.handoffs,
            checkpoint_at=(pr.checkpoint or {}).get("at"),
            timeout=pr.timeout,
            started_at=pr.started_at,
            finished_at=pr.finished_at,
            duration=pr.duration,
            error=pr.error,
            traceback=pr.traceback,
            depends_on=list(pr.depends_on),
            worker=pr.worker,
            shard_index=pr.shard_index if pr.shard_of else None,
        )

    def with_shards(self, shards: list[PhaseReport]) -> PhaseReport:
        """This phase's report with its shards: its progress counts theirs and its merge's,
        and it started, and runs, from when its first shard did (its own row's times and
        state are its merge's)."""
        progress = self.progress
        if not self.done and shards:
            progress = (sum(s.progress for s in shards) + self.progress) / (len(shards) + 1)
        started_at, duration = self.started_at, self.duration
        starts = [s.started_at for s in shards if s.started_at is not None]
        if starts and (started_at is None or min(starts) < started_at):
            started_at = min(starts)
            end = self.finished_at or timezone.now()
            duration = max((end - started_at).total_seconds(), 0.0)
        state = self.state
        if state == PhaseState.PENDING and starts:
            # Its own row waits for the merge; the phase runs from its first shard's start.
            state = PhaseState.RUNNING
        return replace(
            self,
            shards=shards,
            state=state,
            progress=progress,
            started_at=started_at,
            duration=duration,
        )

    def lanes(self) -> list[PhaseReport]:
        """This phase, then its shards (what a display shows one line each of)."""
        return [self, *(self.shards or [])]

    @property
    def done(self) -> bool:
        return self.state in PHASE_DONE

    @property
    def state_label(self) -> str:
        """The state in the current language."""
        return str(PhaseState(self.state).label)

    def as_dict(self) -> dict[str, Any]:
        """The phase in ``init_status --json`` (README: Commands)."""
        return {
            "name": self.name,
            "state": self.state,
            "reason": self.reason or None,
            "progress": round(self.progress, 4),
            "message": self.message,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "losses": self.losses,
            "max_losses": self.max_losses,
            "handoffs": self.handoffs,
            "checkpoint_at": self.checkpoint_at,
            "timeout": self.timeout,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration": self.duration,
            "error": (self.error + ("\n\n" + self.traceback if self.traceback else "")) or None,
            **(
                {}
                if self.shards is None
                else {
                    "shards": [
                        {**s.as_dict(), "index": s.shard_index, "worker": s.worker}
                        for s in self.shards
                    ]
                }
            ),
        }

    def public(self) -> dict[str, Any]:
        """What anyone may see: the name, the state and the progress."""
        return {"name": self.name, "state": self.state, "progress": round(self.progress, 4)}


@dataclass(frozen=True)
class ArtifactReport:
    name: str
    format: str
    size: int
    digest: str
    run_id: int | None

    @classmethod
    def of(cls, art: Artifact) -> ArtifactReport:
        return cls(art.name, art.format, art.size, art.digest, art.run_id)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "size": self.size, "format": self.format}


@dataclass(frozen=True)
class GenerationReport:
    id: int
    run_id: int
    is_active: bool
    activated_at: datetime | None
    artifacts: list[ArtifactReport]

    @classmethod
    def of(cls, gen: Generation) -> GenerationReport:
        return cls(
            id=gen.pk,
            run_id=gen.run_id,
            is_active=gen.is_active,
            activated_at=gen.activated_at,
            artifacts=[ArtifactReport.of(a) for a in gen.artifacts.order_by("name")],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run": self.run_id,
            "activated_at": _iso(self.activated_at),
            "artifacts": [a.as_dict() for a in self.artifacts],
        }


@dataclass(frozen=True)
class RunReport:
    """One run and its phases; ``estimate_remaining`` in seconds (None: unknown)."""

    id: int
    state: str
    trigger: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration: float | None
    error: str
    phases: list[PhaseReport]
    estimate_remaining: float | None

    @property
    def in_flight(self) -> bool:
        return self.state in (RunState.PENDING, RunState.RUNNING)

    @property
    def progress(self) -> float:
        """From 0 to 1: the mean of its phases' (a cached phase counts as done)."""
        return history.overall_progress(self.phases)

    def lanes(self) -> list[PhaseReport]:
        """Every phase, each sharded one followed by its shards."""
        return [lane for p in self.phases for lane in p.lanes()]

    @property
    def done_count(self) -> int:
        return sum(p.done for p in self.phases)

    def as_dict(self) -> dict[str, Any]:
        """The run in ``init_status --json`` (README: Commands)."""
        return {
            "id": self.id,
            "state": self.state,
            "trigger": self.trigger,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "error": self.error or None,
            "phases": [p.as_dict() for p in self.phases],
            "estimate_remaining": self.estimate_remaining,
        }

    def public(self) -> dict[str, Any]:
        """Progress anyone may see: phase names, states and fractions; no messages or errors."""
        return {
            "run_state": self.state,
            "progress": round(self.progress, 4) if self.phases else 0.0,
            "estimate_seconds": self.estimate_remaining if self.in_flight else None,
            "phases": [p.public() for p in self.phases],
        }


#: public() of "no run yet".
NO_RUN_PUBLIC: dict[str, Any] = {
    "run_state": None,
    "progress": 0.0,
    "estimate_seconds": None,
    "phases": [],
}


def run_report(
    run: PipelineRun, phases: Sequence[PhaseRun] | None = None, *, estimate: bool = True
) -> RunReport:
    """The report of ``run``; ``phases``: its PhaseRun rows, when the caller has them."""
    rows = list(phases) if phases is not None else list(run.phases.order_by("position"))
    seconds = history.estimate_remaining(run, rows) if estimate else None
    return RunReport(
        id=run.pk,
        state=run.state,
        trigger=run.trigger,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        duration=run.duration,
        error=run.error,
        phases=_grouped(rows),
        estimate_remaining=None if seconds is None else round(seconds, 1),
    )


def _grouped(rows: Sequence[PhaseRun]) -> list[PhaseReport]:
    """The phases of a run, each sharded one with its shards under it."""
    shards: dict[str, list[PhaseReport]] = {}
    for pr in rows:
        if pr.shard_of:
            shards.setdefault(pr.shard_of, []).append(PhaseReport.of(pr))
    return [
        PhaseReport.of(pr).with_shards(shards.get(pr.name, []))
        if pr.shard_count is not None
        else PhaseReport.of(pr)
        for pr in rows
        if not pr.shard_of
    ]


@dataclass(frozen=True)
class WebProcessReport:
    """A web process that serves in the background, as it last reported (servers.py)."""

    host: str
    pid: int
    server: str
    state: str
    #: The generation whose artifacts it serves (None: none loaded yet).
    generation: int | None
    #: Artifact name -> the generation of what it serves of it.
    serves: dict[str, int | None]
    #: The generation it is loading (None: none), and the artifacts loading now.
    loading_generation: int | None
    loading: list[str]
    #: Artifact name -> (the error of its last failed load, attempts so far).
    failures: dict[str, tuple[str, int]]
    reported_at: datetime

    @classmethod
    def of(cls, row: WebProcess) -> WebProcessReport:
        loading = row.loading if isinstance(row.loading, dict) else {}
        return cls(
            host=row.host,
            pid=row.pid,
            server=row.server,
            state=row.state,
            generation=row.generation_id,
            serves={n: v.get("generation") for n, v in (row.serves or {}).items()},
            loading_generation=loading.get("target"),
            loading=sorted(loading.get("since") or {}),
            failures={
                n: (str(v.get("error", "")), int(v.get("attempts", 0)))
                for n, v in (row.failures or {}).items()
            },
            reported_at=row.reported_at,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "server": self.server or None,
            "state": self.state,
            "generation": self.generation,
            "serves": self.serves,
            "loading_generation": self.loading_generation,
            "loading": self.loading,
            "failures": {
                n: {"error": error, "attempts": attempts}
                for n, (error, attempts) in self.failures.items()
            },
            "reported_at": _iso(self.reported_at),
        }


def web_reports() -> list[WebProcessReport]:
    """The web processes that reported lately (one query)."""
    rows = WebProcess.objects.reporting(within=REPORT_STALE).order_by("host", "server", "pid")
    return [WebProcessReport.of(row) for row in rows]


@dataclass(frozen=True)
class StatusReport:
    """The init as a whole: ``state`` is ready, not_ready or failed (README: init_status)."""

    state: str
    active: GenerationReport | None
    run: RunReport | None
    #: The web processes that serve in the background and report what they serve.
    web: list[WebProcessReport] = field(default_factory=list)
    #: Required artifacts of the active generation whose file is bad here: name -> why.
    corrupt: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """``init_status --json`` and ``/init/status.json``."""
        return {
            "state": self.state,
            "corrupt": self.corrupt,
            "active_generation": None if self.active is None else self.active.as_dict(),
            "run": None if self.run is None else self.run.as_dict(),
            "web": [w.as_dict() for w in self.web],
        }


def status_report(*, run_id: int | None = None) -> StatusReport:
    """The state of the init, and of run ``run_id`` (default: the latest run)."""
    active = Generation.objects.active()
    latest = PipelineRun.objects.latest_first().first()
    run = PipelineRun.objects.filter(pk=run_id).first() if run_id is not None else latest
    if run_id is not None and run is None:
        raise PipelineConfigError(f"there is no run {run_id}")
    corrupt: dict[str, str] = {}
    if active is not None:
        # What /init/readyz refuses on this host: a required artifact whose file is known
        # to be bad (a stat each, no hashing).
        required = set(required_artifacts())
        for art in active.artifacts.all():
            reason = storage.problem(art) if art.name in required else None
            if reason:
                corrupt[art.name] = reason
    if latest is not None and latest.state == RunState.FAILED:
        state = FAILED
    elif active is not None and not corrupt:
        state = READY
    else:
        state = NOT_READY
    return StatusReport(
        state=state,
        active=None if active is None else GenerationReport.of(active),
        run=None if run is None else run_report(run),
        web=web_reports(),
        corrupt=corrupt,
    )


def latest_run_report() -> RunReport | None:
    """The latest run, for the warming-up page and /init/readyz (None: no run yet)."""
    run = PipelineRun.objects.latest_first().first()
    return None if run is None else run_report(run, estimate=run.is_in_flight)


@dataclass(frozen=True)
class RunOutcome:
    """What a run left: the generation it made (if any), else the artifacts it published."""

    generation: GenerationReport | None
    published: list[ArtifactReport]


def run_outcome(run: PipelineRun) -> RunOutcome:
    generation = Generation.objects.filter(run=run).first()
    if generation is not None:
        return RunOutcome(GenerationReport.of(generation), [])
    return RunOutcome(None, [ArtifactReport.of(a) for a in run.artifacts.all()])


__all__ = [
    "FAILED",
    "NOT_READY",
    "READY",
    "ArtifactReport",
    "GenerationReport",
    "PhaseReport",
    "RunOutcome",
    "RunReport",
    "StatusReport",
    "WebProcessReport",
    "latest_run_report",
    "run_outcome",
    "run_report",
    "status_report",
    "web_reports",
]
