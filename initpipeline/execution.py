"""Running a phase inside a Celery worker: claiming its row, the heartbeat beside it, the
hand-back of a phase planned with other code, and a worker shutting down.

A copy of a phase task claims the phase's row (``claim``), runs the phase with a
heartbeat thread beside it, and has outcomes.py record what came of it.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from django.db import connection, transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from . import dispatch, processes, retention, shards, storage, tracing
from .conf import settings
from .context import PhaseContext
from .exceptions import (
    PhaseCancelled,
    PhaseFailed,
    PhaseHandedOff,
    PhaseSkipped,
    PipelineConfigError,
)
from .models import (
    IN_FLIGHT,
    PHASE_DONE,
    PHASE_UNFINISHED,
    PhaseRun,
    PhaseState,
    RunState,
)
from .outcomes import (
    fail_phase,
    record_failed_attempt,
    record_handed_off,
    record_stopped,
    record_succeeded,
)
from .registry import Pipeline, get_pipeline

logger = logging.getLogger("initpipeline")

Published = dict[str, tuple[storage.Published, str, dict[str, Any]]]


# -- claiming the phase -------------------------------------------------------------------

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


# -- a worker shutting down ---------------------------------------------------------------


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
