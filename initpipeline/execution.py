"""Running a phase inside a Celery worker and recording its outcome, up to activation.

A copy of a phase task claims the phase's row (``claim``), runs the phase with a
heartbeat thread beside it, and writes one outcome: succeeded (with its artifacts), a
failed attempt (retried after a backoff, or failed for good), or stopped (the run was
cancelled). The last step of a run, ``finish_run``, activates its generation.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from django.db import connection, transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from . import checkpoints, dispatch, processes, retention, shards, storage, tracing
from .conf import settings
from .context import PhaseContext
from .exceptions import (
    PhaseCancelled,
    PhaseFailed,
    PhaseHandedOff,
    PhaseSkipped,
    PipelineConfigError,
    RetryPhase,
)
from .formatters import storable
from .models import (
    IN_FLIGHT,
    PHASE_DONE,
    PHASE_UNFINISHED,
    Artifact,
    Generation,
    PhaseRun,
    PhaseState,
    PipelineRun,
    RunState,
)
from .registry import Pipeline, descendants, get_pipeline

logger = logging.getLogger("initpipeline")

Published = dict[str, tuple[storage.Published, str, dict[str, Any]]]


# -- claiming the phase -------------------------------------------------------------------

HANDED_OFF = "handed_off"

#: Seconds a worker with other code than planned waits before it hands a phase back, so
#: that old workers do not pass its message between them in a tight loop; a tenth of the
#: wait so far once that is longer, up to SKEW_PAUSE_MAX.
SKEW_PAUSE = 1.0
SKEW_PAUSE_MAX = 10.0


def claim(run_id: int, phase_name: str, task_id: str, worker: str) -> PhaseRun:
    """Make this delivery the owner of the phase's row, or raise PhaseSkipped/PhaseFailed.

    The row is the lock: a copy runs the phase only when it is pending, or running with a
    heartbeat older than STALE_AFTER (its worker is gone: a loss, which does not count as
    an attempt, up to LOST_LIMIT). Each claim takes the next lease; (row, lease) identifies
    the owner from then on (PhaseRun.objects.owned). A new attempt begins unless the last
    one was interrupted (lost, or handed off at a worker's shutdown): that one continues,
    from its checkpoint when it left one.
    """
    stale_after = settings.STALE_AFTER
    lost = ""
    out_of_losses = False
    with transaction.atomic():
        pr = (
            PhaseRun.objects.select_for_update()
            .select_related("run")
            .get(run_id=run_id, name=phase_name)
        )
        run = pr.run
        now = timezone.now()
        if run.state not in IN_FLIGHT:
            raise PhaseSkipped(f"run {run_id} is {run.state}")
        if pr.state in PHASE_DONE:
            raise PhaseSkipped(f"phase {phase_name} is already {pr.state} (duplicate delivery)")
        if pr.state not in PHASE_UNFINISHED:
            raise PhaseSkipped(f"phase {phase_name} is {pr.state}")
        resume = pr.interrupted
        if pr.state == PhaseState.RUNNING:
            age = pr.heartbeat_age(now)
            if age < stale_after:
                # At-least-once delivery: Redis delivers a task again while it still runs
                # once visibility_timeout has passed (celery#5935), under the same task id,
                # so only the heartbeat tells a live copy from a lost one.
                raise PhaseSkipped(
                    f"phase {phase_name} lease {pr.lease} is running in task "
                    f"{pr.task_id} on {pr.worker} (heartbeat {age:.1f} s ago)"
                )
            lost = pr.lost_reason(now)
            if pr.out_of_losses:
                out_of_losses = fail_phase(pr, _out_of_losses(pr, lost), "")
            pr.losses += 1
            resume = True
        if not out_of_losses:
            pr.state = PhaseState.RUNNING
            pr.lease += 1
            if not resume or pr.attempt == 0:
                pr.attempt += 1
            pr.interrupted = False
            pr.handoff_requested_at = None
            pr.waiting_since = None
            pr.task_id = task_id
            pr.worker = worker[:255]
            pr.worker_pid = os.getpid()
            pr.started_at = pr.started_at or now
            pr.heartbeat_at = now
            pr.finished_at = None
            point = pr.checkpoint or {}
            pr.progress_done = float(point.get("done") or 0)
            pr.progress_total = point.get("total")
            pr.message = _claim_message(pr, lost)[:500]
            pr.save()
            if run.state == RunState.PENDING:
                run.state = RunState.RUNNING
                run.started_at = now
                run.save(update_fields=["state", "started_at"])
    if out_of_losses:
        logger.error("phase %s of run %s failed: %s", phase_name, run_id, _out_of_losses(pr, lost))
        raise PhaseFailed(_out_of_losses(pr, lost))
    if lost:
        logger.warning(
            "phase %s of run %s: lease %d takes over (%s)", pr.name, run_id, pr.lease, lost
        )
    tracing.phase_claimed(pr, task_id=task_id, worker=pr.worker, lost=lost)
    if pr.losses or resume:
        # A copy before this one was lost or handed off: what it was writing is garbage.
        retention.forget_scratch_of(pr.run_id, pr.pk)
    return pr


def _out_of_losses(pr: PhaseRun, lost: str) -> str:
    return f"{lost}; lost more often than LOST_LIMIT ({pr.max_losses}) allows"


def _claim_message(pr: PhaseRun, lost: str) -> str:
    parts = [f"took over: {lost}"] if lost else []
    point = pr.checkpoint
    if point:
        total = point.get("total")
        where = f" at {100 * point['done'] / total:.0f}%" if total and point.get("done") else ""
        parts.append(f"resumed from its checkpoint{where}")
    return "; ".join(parts)


def planned_by_this_code(pipeline: Pipeline, pr: PhaseRun) -> str:
    """The fingerprint this worker's code gives the phase (or shard) of row ``pr``; "" when
    it does not know the phase or cannot compute it."""
    phase_name = pr.shard_of or pr.name
    try:
        if phase_name not in pipeline:
            return ""
        mine = pipeline.fingerprints().get(phase_name, "")
    except PipelineConfigError:
        return ""  # This worker's pipeline is broken: another worker's may not be.
    if pr.shard_of and pr.shard_index is not None and pr.shard_count:
        return shards.fingerprint(mine, pr.shard_index, pr.shard_count)
    return mine


def wrong_code(run_id: int, phase_name: str, pipeline: Pipeline) -> tuple[PhaseRun, str] | None:
    """The phase's row and this worker's fingerprint of it, when they differ from the plan.

    A deploy restarts workers while the release step already planned a run with the new
    code: an old worker must never publish its output under the new plan's fingerprint.
    """
    pr = PhaseRun.objects.filter(run_id=run_id, name=phase_name).first()
    if pr is None:
        raise PhaseSkipped(f"run {run_id} has no phase {phase_name}")
    mine = planned_by_this_code(pipeline, pr)
    return None if mine == pr.fingerprint else (pr, mine)


def hand_back_for_planned_code(pr: PhaseRun, mine: str) -> NoReturn:
    """Send the phase again for a worker running the planned code, or fail the run after
    SKEW_TIMEOUT; raises PhaseSkipped (handed back) or PhaseFailed."""
    now = timezone.now()
    theirs = mine[:12] + "…" if mine else "none: this worker does not know the phase"
    waiting = (
        f"waiting for a worker running the planned code (planned fingerprint "
        f"{pr.fingerprint[:12]}…, this worker's {theirs})"
    )
    if pr.state != PhaseState.PENDING:
        raise PhaseSkipped(f"phase {pr.name} is {pr.state}; {waiting}")
    PhaseRun.objects.filter(pk=pr.pk, state=PhaseState.PENDING).update(
        message=waiting[:500], waiting_since=Coalesce(F("waiting_since"), Value(now))
    )
    pr.refresh_from_db()
    since = pr.waiting_since or now
    if (now - since).total_seconds() > settings.SKEW_TIMEOUT:
        reason = (
            f"no worker ran the planned code within SKEW_TIMEOUT ({settings.SKEW_TIMEOUT:.0f} s): "
            f"{waiting}"
        )
        if fail_phase(pr, reason, ""):
            logger.error("phase %s of run %s failed: %s", pr.name, pr.run_id, reason)
            raise PhaseFailed(reason)
        raise PhaseSkipped(reason)
    waited = (now - since).total_seconds()
    # Once per phase, not once per hand-back: a worker with other code may pass the same
    # phase back for minutes (the deploy's new workers are still starting).
    log = logger.warning if waited == 0 else logger.debug
    log("phase %s of run %s: %s; handing it back", pr.name, pr.run_id, waiting)
    # Less often the longer it waits: a tenth of the wait so far, between SKEW_PAUSE and
    # SKEW_PAUSE_MAX.
    time.sleep(min(SKEW_PAUSE_MAX, max(SKEW_PAUSE, waited / 10)))
    resend_from(pr)
    raise PhaseSkipped(f"{waiting}; handed back")


def resend_from(pr: PhaseRun) -> None:
    """Send the chain that starts at ``pr`` (pending again) as a new message."""
    phases = list(PhaseRun.objects.filter(run_id=pr.run_id).order_by("position"))
    chains = dispatch.plan_chains(phases, start=[pr.name])
    dispatch.send_chain(pr.run_id, chains[0] if chains else [pr.name])


# -- running it ---------------------------------------------------------------------------


class Heartbeat(threading.Thread):
    """Writes the phase's heartbeat every HEARTBEAT_INTERVAL while this copy owns the row.

    Once it does not (the run was cancelled, or a stale phase was taken over by recovery or
    by another delivery), the thread sets ``ctx.cancelled``: the phase stops at its next
    progress() or heartbeat() call, and this copy records nothing. When the worker asks
    for the phase back (it is shutting down), the thread sets ``ctx.handoff`` and keeps
    beating while the phase checkpoints.
    """

    def __init__(self, pr: PhaseRun, ctx: PhaseContext) -> None:
        super().__init__(name=f"initpipeline-heartbeat-{pr.pk}", daemon=True)
        self.phase_run_id = pr.pk
        self.lease = pr.lease
        self.ctx = ctx
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = settings.HEARTBEAT_INTERVAL
        try:
            while not self.stopped.wait(interval):
                try:
                    alive = self.beat()
                except Exception:
                    logger.exception("heartbeat of phase run %s failed", self.phase_run_id)
                    continue
                if not alive:
                    self.ctx.cancelled.set()
                    return
        finally:
            # Django connections are per thread: close this thread's own.
            connection.close()

    def beat(self) -> bool:
        """One heartbeat; False when this copy no longer owns the row."""
        owned = PhaseRun.objects.owned(self.phase_run_id, self.lease)
        now = timezone.now()
        if owned.filter(handoff_requested_at__isnull=True).update(heartbeat_at=now):
            return True
        if not owned.update(heartbeat_at=now):
            return False
        self.ctx.handoff.set()
        return True

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


def execute_phase(
    *, run_id: int, phase_name: str, task_id: str = "", worker: str = "", advance: bool = False
) -> str:
    """Run one phase of a run and record the outcome; returns the phase's final state.

    ``advance``: this phase ends its chain, so once it succeeds it sends the phases it
    unblocks (or the run's finish step, when no phase is left).

    Returns succeeded; cancelled when the run was cancelled while the phase ran; or
    handed_off when this worker is shutting down and gave the phase back (sent again, to
    resume from its checkpoint). Raises RetryPhase when it failed with attempts left,
    PhaseFailed when it failed for good (the run is then failed), PhaseSkipped when this
    delivery must not run it (a duplicate; other code than the run planned, handed back),
    or lost the phase to another copy while it ran: such a copy records nothing.
    """
    if worker_leaving(worker):
        # A message a worker took while shutting down: left for another worker (this
        # worker's main process sends the phase again as it exits).
        raise PhaseSkipped(f"{worker} is shutting down; phase {phase_name} left for another")
    entered = time.monotonic()
    pipeline = get_pipeline()
    skew = wrong_code(run_id, phase_name, pipeline)
    if skew is not None:
        hand_back_for_planned_code(*skew)
    pr = claim(run_id, phase_name, task_id, worker or socket.gethostname())
    claimed = time.monotonic() - entered
    phase = pipeline[pr.shard_of or phase_name]
    ctx = PhaseContext(phase=phase, phase_run=pr, pipeline=pipeline)
    # A sharded phase's own row merges what its shards made; each shard runs the function.
    work: Any = phase.func
    if phase.sharded and not pr.shard_of:
        work = phase.merge or shards.merge_default
    beat = Heartbeat(pr, ctx)
    beat.start()
    started = time.monotonic()
    try:
        with heap_set_aside():
            work(ctx)
        published = ctx.published()
    except Exception as exc:
        beat.stop()
        if isinstance(exc, PhaseHandedOff) and ctx.handoff.is_set():
            return record_handed_off(pr, "handed back by its worker, which is shutting down")
        if isinstance(exc, PhaseCancelled) and ctx.cancelled.is_set():
            return record_stopped(pr, time.monotonic() - started)
        record_failed_attempt(pr, exc, traceback.format_exc())
    beat.stop()
    ran = time.monotonic() - started
    state = record_succeeded(pr, published, ran, advance=advance)
    costs = ctx.costs()
    costs["claim"] = (claimed, 1)
    costs["record"] = (time.monotonic() - started - ran, 1)
    logger.info("phase %s of run %s: %s", phase_name, run_id, describe_costs(costs, ran))
    return state


def describe_costs(costs: dict[str, tuple[float, int]], ran: float) -> str:
    """One line: where a phase's time in initpipeline went (PhaseContext.costs, plus the
    task's claim of the phase and its record of the outcome), e.g.
    ``0.42 s of 7.31 s in initpipeline: publish 0.31 s (3), progress 0.05 s (16); claim
    0.01 s, record 0.02 s``. The first two numbers: inside the phase's run."""
    inside = {k: v for k, v in costs.items() if k not in ("claim", "record")}
    spent = sum(seconds for seconds, _ in inside.values())
    parts = ", ".join(f"{k} {s:.3f} s ({n})" for k, (s, n) in sorted(inside.items()))
    task = ", ".join(f"{k} {costs[k][0]:.3f} s" for k in ("claim", "record") if k in costs)
    return f"{spent:.3f} s of {ran:.3f} s in initpipeline: {parts or 'nothing'}; {task}"


@contextmanager
def heap_set_aside() -> Iterator[None]:
    """Run the phase with the worker's own heap out of the garbage collector's way.

    A worker holds more objects than a plain process (Celery, kombu, the admin...), and
    every full collection walks them all: an allocation-heavy phase (the demo's
    collect_docstrings builds an ast tree per file) ran 5-7 % slower in a worker than
    alone. Collected, then frozen (gc.freeze), they are skipped: the same phase then ran
    10-15 % faster than alone. Unfrozen afterwards, so that what they leave as garbage is
    collected as usual.

    Only the young generations are collected first: a full collection walks the whole heap
    (50 ms in a worker, more than a short shard's own work). Garbage already in the oldest
    generation is frozen with the rest and collected after the phase, once unfrozen.
    """
    gc.collect(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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


def leaving_marker(hostname: str, pid: int | None = None) -> Path:
    """The file that says, on this host, that the worker ``hostname`` whose main process
    is ``pid`` (default: this process) is shutting down.

    Named by the process as well as the node name: node names are unique among live
    workers at best (two projects of one user may both run ``celery@host``), and a worker
    that shut down must not keep a later one with its name from working.
    """
    folder = storage.cache_dir() / "leaving"
    folder.mkdir(exist_ok=True)
    return folder / f"{hostname.replace(os.sep, '_')}.{processes.instance(pid)}"


def worker_leaving(hostname: str) -> bool:
    """Whether the worker this process belongs to is shutting down: its main process is
    this one's parent (a pool process) or this one (a solo or thread pool)."""
    if not hostname:
        return False
    return any(leaving_marker(hostname, pid).exists() for pid in (os.getppid(), os.getpid()))


def forget_gone_workers() -> None:
    """Remove the shutdown marks of worker processes that are gone."""
    folder = storage.cache_dir() / "leaving"
    for path in folder.glob("*.*-*") if folder.exists() else []:
        pid, _, start = path.suffix.lstrip(".").partition("-")
        if pid.isdigit() and start.isdigit() and not processes.alive(int(pid), int(start) or None):
            path.unlink(missing_ok=True)


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
        except Exception:
            # The new generation is active; a failed clean-up must not undo that.
            logger.exception("deleting old artifacts after run %s failed", run_id)
    return generation
