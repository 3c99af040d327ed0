"""What came of a phase, recorded; and a run's activation.

A copy of a phase (execution.py) writes one outcome: succeeded (with its artifacts, and
what that unblocks), a failed attempt (retried after a backoff, or failed for good, with
the phases below it), handed back (its worker is shutting down) or stopped (the run was
cancelled). Recovery, the commands and the admin record through the same functions. The
last step of a run, ``finish_run``, activates its generation.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime
from typing import Any, NoReturn

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from . import checkpoints, dispatch, retention, storage, tracing
from .conf import settings
from .exceptions import PhaseFailed, PhaseSkipped, RetryPhase
from .formatters import storable
from .models import (
    IN_FLIGHT,
    PHASE_DONE,
    Artifact,
    Generation,
    PhaseRun,
    PhaseState,
    PipelineRun,
    RunState,
)
from .registry import descendants, get_pipeline

logger = logging.getLogger("initpipeline")

Published = dict[str, tuple[storage.Published, str, dict[str, Any]]]

HANDED_OFF = "handed_off"


# -- outcomes -----------------------------------------------------------------------------


def _taken_over(pr: PhaseRun) -> PhaseSkipped:
    return PhaseSkipped(
        f"phase {pr.name} of run {pr.run_id}: lease {pr.lease} no longer owns the phase "
        "(cancelled, taken over after its heartbeat went stale, or handed back); recording "
        "nothing"
    )


def record_stopped(pr: PhaseRun, seconds: float) -> str:
    """The phase stopped itself because it no longer owns its row."""
    stopped = PhaseRun.objects.filter(pk=pr.pk, lease=pr.lease, state=PhaseState.CANCELLED).update(
        finished_at=timezone.now(), message=f"cancelled; stopped after {seconds:.1f} s"
    )
    if not stopped:
        raise _taken_over(pr)
    logger.info("phase %s of run %s stopped: run cancelled", pr.name, pr.run_id)
    return PhaseState.CANCELLED


def record_failed_attempt(pr: PhaseRun, exc: BaseException, tb: str) -> NoReturn:
    """Record a failed attempt; raise RetryPhase (attempts left) or PhaseFailed."""
    error = storable(f"{type(exc).__name__}: {exc}")
    tb = storable(tb)
    if type(exc).__name__ == "SoftTimeLimitExceeded":
        # Celery's soft limit, set to the phase's timeout when the chain was sent.
        error = f"timed out after {pr.timeout} s (Celery soft time limit)"
    if pr.attempt < pr.max_attempts:
        countdown = backoff(pr.attempt)
        # heartbeat_at = now: the worker is alive and the retry is on its way; recovery
        # allows the backoff to pass before it counts the phase as lost (recovery.py).
        # Only while the run is in flight: a phase that fails after one beside it failed
        # the run has nothing to retry for, and fails below.
        retrying = (
            PhaseRun.objects.owned(pr.pk, pr.lease)
            .filter(run__state__in=IN_FLIGHT)
            .update(
                state=PhaseState.PENDING,
                error=error,
                traceback=tb,
                heartbeat_at=timezone.now(),
                message=f"attempt {pr.attempt} failed; retrying in {countdown:.0f} s",
            )
        )
        if retrying:
            tracing.event(
                pr, tracing.RETRY, error=error, attempt=pr.attempt, countdown=round(countdown, 3)
            )
            logger.warning(
                "phase %s attempt %d/%d failed (%s); retrying in %.1f s",
                pr.name,
                pr.attempt,
                pr.max_attempts,
                error,
                countdown,
            )
            raise RetryPhase(countdown) from exc
    # fail_phase changes nothing when this attempt no longer owns the phase.
    if not fail_phase(pr, error, tb):
        raise _taken_over(pr) from exc
    logger.error("phase %s of run %s failed: %s\n%s", pr.name, pr.run_id, error, tb)
    raise PhaseFailed(error) from exc


def record_succeeded(
    pr: PhaseRun, published: Published, seconds: float, *, advance: bool = False
) -> str:
    """Record the phase's artifacts and its success; with ``advance``, send what it unblocked."""
    with transaction.atomic():
        if advance:
            # The run's row serialises the ends of parallel chains: of two phases that a
            # third waits for, exactly one sees the other done and sends the third.
            run_state = (
                PipelineRun.objects.select_for_update()
                .filter(pk=pr.run_id)
                .values_list("state", flat=True)
                .get()
            )
        row = PhaseRun.objects.select_for_update().filter(pk=pr.pk).values("lease", "state")
        current = row.get()
        mine = current["lease"] == pr.lease
        state = current["state"]
        if mine and state in (PhaseState.RUNNING, PhaseState.CANCELLED):
            # The files are complete and verified by checksum: a phase that finished as its
            # run was cancelled (or failed elsewhere) still records them, so the next run
            # finds them cached.
            for name, (pub, fmt, metadata) in published.items():
                Artifact.objects.create(
                    name=name,
                    fingerprint=pr.fingerprint,
                    storage_key=pub.key,
                    digest=pub.digest,
                    size=pub.size,
                    format=fmt,
                    metadata=metadata,
                    run_id=pr.run_id,
                    phase_run=pr,
                )
        if mine and state == PhaseState.RUNNING:
            PhaseRun.objects.filter(pk=pr.pk).update(
                state=PhaseState.SUCCEEDED,
                finished_at=timezone.now(),
                progress_done=1,
                progress_total=1,
                error="",
                traceback="",
                worker_pid=None,
            )
            transaction.on_commit(lambda: drop_checkpoints(pr))
            merge_waits = pr.shard_of and not _count_shard_done(pr)
            if advance and run_state in IN_FLIGHT and not merge_waits:
                _advance(pr)
    if not mine or state not in (PhaseState.RUNNING, PhaseState.CANCELLED):
        raise _taken_over(pr)
    if state == PhaseState.CANCELLED:
        PhaseRun.objects.filter(pk=pr.pk).update(
            finished_at=timezone.now(),
            message="cancelled as it finished; its artifacts are kept for the next run",
        )
        logger.info("phase %s of run %s finished after its run was cancelled", pr.name, pr.run_id)
        return PhaseState.CANCELLED
    logger.info("phase %s of run %s succeeded in %.2f s", pr.name, pr.run_id, seconds)
    return PhaseState.SUCCEEDED


def record_handed_off(pr: PhaseRun, why: str) -> str:
    """Put the phase back in the queue, to continue (from its checkpoint) on another worker.

    Neither an attempt nor a loss: the worker was asked to stop. Raises PhaseSkipped when
    this copy no longer owns the row.
    """
    handed = PhaseRun.objects.owned(pr.pk, pr.lease).update(
        state=PhaseState.PENDING,
        handoffs=F("handoffs") + 1,
        interrupted=True,
        handoff_requested_at=None,
        worker_pid=None,
        heartbeat_at=timezone.now(),
        message=f"{why}; sent again"[:500],
    )
    if not handed:
        raise _taken_over(pr)
    tracing.event(pr, tracing.HANDED_OFF, reason=why)
    # Not sent again from here: a worker shutting down may still take messages (kombu's
    # filesystem transport does, until its pool is idle). The worker's main process sends
    # it as it exits (signals.py), and recovery does if the worker dies first.
    logger.info("phase %s of run %s: %s", pr.name, pr.run_id, why)
    return HANDED_OFF


def drop_checkpoints(pr: PhaseRun) -> None:
    """The phase succeeded: delete its checkpoints, this run's and those it could resume."""
    try:
        checkpoints.drop(name=pr.name, fingerprint=pr.fingerprint)
    except Exception:
        logger.exception("deleting the checkpoints of phase %s failed", pr.name)


def _count_shard_done(pr: PhaseRun) -> bool:
    """Inside record_succeeded's transaction: count shard ``pr`` done on its phase's row;
    True when it was the last shard the phase waited for.

    A constant number of queries whatever the shard count: reading the run's rows after
    each shard (to see whether the merge may start) cost 1,000 shards a million row reads.
    The run's row lock (taken by every shard ending a chain) serialises the counts, so
    exactly one shard sees the count complete and sends the merge.
    """
    merge = PhaseRun.objects.filter(run_id=pr.run_id, name=pr.shard_of)
    merge.update(shards_done=F("shards_done") + 1)
    done, count = merge.values_list("shards_done", "shard_count").get()
    return bool(done >= (count or 0))


def _advance(pr: PhaseRun) -> None:
    """Inside record_succeeded's transaction: send, once it commits, what ``pr`` unblocked."""
    phases = list(PhaseRun.objects.filter(run_id=pr.run_id).order_by("position"))
    chains = dispatch.unblocked_by(phases, pr.name)
    finish = all(p.state in PHASE_DONE for p in phases)
    if chains or finish:
        run_id, name = pr.run_id, pr.name
        transaction.on_commit(lambda: dispatch.send_next(run_id, name, chains, finish))


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter: a delay in [base*2^(n-1)/2, base*2^(n-1)]."""
    return backoff_ceiling(attempt) / 2 + random.uniform(0, backoff_ceiling(attempt) / 2)


def backoff_ceiling(attempt: int) -> float:
    """The longest delay backoff(attempt) may choose."""
    base = settings.RETRY_BACKOFF
    return min(settings.RETRY_BACKOFF_MAX, base * float(2 ** max(attempt - 1, 0)))


def fail_phase(pr: PhaseRun, error: str, tb: str, *, stale_before: datetime | None = None) -> bool:
    """Fail this attempt of the phase, the phases that depend on it, and the run.

    Returns False, changing nothing, when the attempt no longer holds the row (another copy
    claimed it, or it ended) or, with ``stale_before``, when it showed a sign of life since.
    """
    now = timezone.now()
    error, tb = storable(error), storable(tb)
    with transaction.atomic():
        mine = PhaseRun.objects.held(pr.pk, pr.lease)
        if stale_before is not None:
            mine = mine.stale(stale_before)
        if not mine.update(state=PhaseState.FAILED, error=error, traceback=tb, finished_at=now):
            return False
        rows = PhaseRun.objects.filter(run_id=pr.run_id).values_list("name", "depends_on")
        below = descendants(dict(rows), pr.name)
        waiting = PhaseRun.objects.filter(run_id=pr.run_id, state=PhaseState.PENDING)
        waiting.filter(name__in=below).update(
            state=PhaseState.UPSTREAM_FAILED, message=f"not run: {pr.name} failed"
        )
        # Phases that do not depend on it: a running one finishes and keeps its artifacts
        # for the next run; a pending one never starts in a failed run.
        waiting.exclude(name__in=below).update(
            state=PhaseState.CANCELLED,
            finished_at=now,
            message=f"not run: the run failed at {pr.name}",
        )
        PipelineRun.objects.filter(pk=pr.run_id, state__in=IN_FLIGHT).update(
            state=RunState.FAILED, finished_at=now, error=f"phase {pr.name} failed: {error}"
        )
    return True


def end_run(run_id: int, state: str, error: str, *, phase_state: str) -> None:
    """End a run in flight with ``state``; its unfinished phases become ``phase_state``."""
    now = timezone.now()
    error = storable(error)
    with transaction.atomic():
        PhaseRun.objects.filter(run_id=run_id).unfinished().update(
            state=phase_state, finished_at=now
        )
        PipelineRun.objects.filter(pk=run_id, state__in=IN_FLIGHT).update(
            state=state, finished_at=now, error=error
        )


# -- activation ---------------------------------------------------------------------------


def _produces(pr: PhaseRun) -> list[str]:
    """What the run planned the phase to produce; rows from before the plan kept it: the code."""
    if pr.produces:
        return list(pr.produces)
    pipeline = get_pipeline()
    return list(pipeline.phases[pr.name].produces) if pr.name in pipeline else []


def finish_run(*, run_id: int) -> Generation | None:
    """Activate the run's generation in one transaction, if every phase is done."""
    with transaction.atomic():
        run = PipelineRun.objects.select_for_update().get(pk=run_id)
        if run.state not in IN_FLIGHT:
            logger.info("run %s is %s; nothing to activate", run_id, run.state)
            return None
        phases = list(run.phases.order_by("position"))
        not_done = [p.name for p in phases if p.state not in PHASE_DONE]
        if not_done:
            end_run(
                run_id,
                RunState.FAILED,
                f"finished with phases not done: {', '.join(not_done)}",
                phase_state=PhaseState.UPSTREAM_FAILED,
            )
            return None
        artifacts: list[Artifact] = []
        for pr in phases:
            if pr.shard_of:
                continue  # A shard's parts serve its merge only; the merge's artifacts serve.
            for name in _produces(pr):
                mine = pr.artifacts.filter(name=name).first()
                record = mine or Artifact.objects.for_fingerprint(name, pr.fingerprint).first()
                problem = None
                if record is None:
                    problem = f"artifact {name!r} of phase {pr.name} has no record"
                elif not storage.is_valid(record):
                    # Deleted or damaged since the run found it cached: never activate a
                    # generation whose files are not all there.
                    problem = (
                        f"artifact {name!r} of phase {pr.name} is missing or fails its check "
                        "in storage; start_init builds it again"
                    )
                if record is None or problem is not None:
                    end_run(
                        run_id,
                        RunState.FAILED,
                        problem or "",
                        phase_state=PhaseState.UPSTREAM_FAILED,
                    )
                    return None
                artifacts.append(record)
        now = timezone.now()
        generation = Generation.objects.create(
            run=run, fingerprints={p.name: p.fingerprint for p in phases if not p.shard_of}
        )
        generation.artifacts.set(artifacts)
        Generation.objects.filter(is_active=True).update(is_active=False)
        generation.is_active = True
        generation.activated_at = now
        generation.save(update_fields=["is_active", "activated_at"])
        run.state = RunState.SUCCEEDED
        run.finished_at = now
        run.save(update_fields=["state", "finished_at"])
    logger.info("run %s succeeded: generation %s is active", run_id, generation.pk)
    if settings.GC_AFTER_ACTIVATION:
        try:
            retention.collect()
            retention.prune_local()
        except Exception:
            # The new generation is active; a failed clean-up must not undo that.
            logger.exception("deleting old artifacts after run %s failed", run_id)
    return generation
