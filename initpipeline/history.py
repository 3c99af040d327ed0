"""What past runs say about this one: per-phase timings and the time left."""

from __future__ import annotations

from django.utils import timezone

from .models import PhaseRun, PhaseState, PipelineRun, RunState


def previous_run(run: PipelineRun) -> PipelineRun | None:
    """The latest successful run before ``run``."""
    return (
        PipelineRun.objects.filter(state=RunState.SUCCEEDED, created_at__lt=run.created_at)
        .exclude(pk=run.pk)
        .latest_first()
        .first()
    )


def previous_timings(run: PipelineRun) -> dict[str, float]:
    """Seconds each phase took when it last ran for real (not cached), before ``run``."""
    timings: dict[str, float] = {}
    for pr in (
        PhaseRun.objects.filter(
            state=PhaseState.SUCCEEDED,
            run__created_at__lt=run.created_at,
            started_at__isnull=False,
            finished_at__isnull=False,
        )
        .exclude(run=run)
        .order_by("-finished_at")
    ):
        if pr.name not in timings and pr.started_at and pr.finished_at:
            timings[pr.name] = (pr.finished_at - pr.started_at).total_seconds()
    return timings


def estimate_remaining(run: PipelineRun) -> float | None:
    """Seconds left for a run in flight, from the phases' last real durations; None if unknown."""
    if not run.is_in_flight:
        return 0.0 if run.state == RunState.SUCCEEDED else None
    timings = previous_timings(run)
    left = 0.0
    now = timezone.now()
    for pr in run.phases.all():
        if pr.state in (PhaseState.SUCCEEDED, PhaseState.CACHED):
            continue
        if pr.name not in timings:
            return None
        expected = timings[pr.name]
        if pr.state == PhaseState.RUNNING and pr.started_at is not None:
            elapsed = (now - pr.started_at).total_seconds()
            left += max(expected - elapsed, expected * (1 - pr.progress), 0.0)
        else:
            left += expected
    return left
