"""What past runs say about this one: per-phase timings, the time left, a run's timeline."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from django.db.models import F, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from .models import PHASE_ENDED, PhaseRun, PhaseState, PipelineRun, RunState


@dataclass(frozen=True)
class Span:
    """One phase on a run's time axis, in seconds from the run's start (None: did not run)."""

    name: str
    state: str
    offset: float | None
    duration: float | None


def previous_run(run: PipelineRun) -> PipelineRun | None:
    """The latest successful run created before ``run``."""
    return (
        PipelineRun.objects.filter(state=RunState.SUCCEEDED, created_at__lt=run.created_at)
        .exclude(pk=run.pk)
        .latest_first()
        .first()
    )


def previous_timings(run: PipelineRun, names: Iterable[str] | None = None) -> dict[str, float]:
    """Seconds each of ``run``'s phases took the last time it ran for real, before ``run``.

    "For real" means it succeeded by doing the work: a cached phase took no time and says
    nothing about the next one, so the phase's last real execution counts, in whichever
    run it happened (the previous successful run may well have had it cached). A phase
    that never ran before has no entry. Retries and their backoff are part of the time.
    One query: the latest real execution of each name, by a window over the names.
    """
    if names is None:
        names = run.phases.values_list("name", flat=True)
    latest = (
        PhaseRun.objects.filter(
            name__in=list(names),
            state=PhaseState.SUCCEEDED,
            run__created_at__lt=run.created_at,
            started_at__isnull=False,
            finished_at__isnull=False,
        )
        .exclude(run=run)
        .annotate(
            rank=Window(
                RowNumber(),
                partition_by=[F("name")],
                order_by=[F("finished_at").desc(), F("id").desc()],
            )
        )
        .filter(rank=1)
        .values_list("name", "started_at", "finished_at")
    )
    return {
        name: max((finished - started).total_seconds(), 0.0)
        for name, started, finished in latest
        if started is not None and finished is not None
    }


def estimate_remaining(
    run: PipelineRun,
    phases: Sequence[PhaseRun] | None = None,
    *,
    timings: Mapping[str, float] | None = None,
    now: datetime | None = None,
) -> float | None:
    """Seconds left for a run in flight; 0 for a run that succeeded; None when unknown.

    Each phase still to do counts with its last real duration (``previous_timings``). The
    running phase counts with what is left of that duration, blended, as its progress grows,
    with what its own pace predicts (elapsed / progress). A phase with no history makes the
    whole estimate unknown: a guess for it would only look precise. A failed or cancelled
    run has nothing left to wait for, so its estimate is None too. Independent phases
    overlap: the estimate is the run's longest path, assuming a worker for each.
    """
    if not run.is_in_flight:
        return 0.0 if run.state == RunState.SUCCEEDED else None
    rows = sorted(run.phases.all() if phases is None else phases, key=lambda p: p.position)
    if timings is None:
        timings = previous_timings(run, [p.name for p in rows])
    now = now or timezone.now()
    own: dict[str, float] = {}
    for pr in rows:
        if pr.state in PHASE_ENDED:
            own[pr.name] = 0.0
            continue
        expected = timings.get(pr.name)
        if expected is None:
            return None
        if pr.started_at is None:
            own[pr.name] = expected
            continue
        # Running, or waiting for a retry after a failed attempt.
        elapsed = max((now - pr.started_at).total_seconds(), 0.0)
        by_history = max(expected - elapsed, 0.0)
        progress = pr.progress
        if progress <= 0.0:
            own[pr.name] = by_history
            continue
        by_pace = elapsed * (1.0 - progress) / progress
        own[pr.name] = (1.0 - progress) * by_history + progress * by_pace
    # Phases with no dependency between them run side by side: the run takes as long as its
    # longest path (a phase comes after its dependencies in position order).
    ends: dict[str, float] = {}
    for pr in rows:
        begins = max((ends.get(d, 0.0) for d in pr.depends_on), default=0.0)
        ends[pr.name] = begins + own[pr.name]
    return max(ends.values(), default=0.0)


def expected_duration(phases: Sequence[PhaseRun], timings: Mapping[str, float]) -> float | None:
    """Seconds the run of ``phases`` takes if each phase it runs takes what it took the last
    time it ran for real (``timings``: previous_timings); a cached phase counts 0. The run's
    longest path, as in estimate_remaining; None when a phase it runs never ran before."""
    rows = sorted(phases, key=lambda p: p.position)
    ends: dict[str, float] = {}
    for pr in rows:
        own = 0.0 if pr.state == PhaseState.CACHED else timings.get(pr.name)
        if own is None:
            return None
        begins = max((ends.get(d, 0.0) for d in pr.depends_on), default=0.0)
        ends[pr.name] = begins + own
    return max(ends.values(), default=0.0)


class _HasProgress(Protocol):
    @property
    def progress(self) -> float: ...


def overall_progress(phases: Iterable[_HasProgress]) -> float:
    """The run's progress from 0 to 1: the mean of its phases' (a cached phase counts as done)."""
    values = [p.progress for p in phases]
    return sum(values) / len(values) if values else 0.0


def spans(run: PipelineRun, phases: Iterable[PhaseRun] | None = None) -> list[Span]:
    """Where each phase of ``run`` sits on the run's time axis."""
    if phases is None:
        phases = run.phases.order_by("position")
    phases = list(phases)
    origin = run.started_at
    # A sharded phase's own row is its merge's: the phase began with its first shard.
    first_shard: dict[str, datetime] = {}
    for p in phases:
        if p.shard_of and p.started_at is not None:
            seen = first_shard.get(p.shard_of)
            first_shard[p.shard_of] = p.started_at if seen is None else min(seen, p.started_at)
    result = []
    for p in phases:
        started, duration = p.started_at, p.duration
        shards_began = first_shard.get(p.name)
        if shards_began is not None and (started is None or shards_began < started):
            started = shards_began
            if p.finished_at is not None:
                duration = max((p.finished_at - started).total_seconds(), 0.0)
        offset = None
        if origin is not None and started is not None:
            offset = max((started - origin).total_seconds(), 0.0)
        result.append(Span(p.name, p.state, offset, duration))
    return result
