"""Finding runs nothing works on any more, from the pipeline's own records, and resuming them.

Brokers lose messages: kombu's filesystem transport drops the message a killed worker held,
Redis gives an unacknowledged one back only after ``visibility_timeout`` (hours), and a
worker killed between two phases may never send the next one (celery#7924). The records
do not lose anything: a running phase writes its heartbeat every HEARTBEAT_INTERVAL, so

1. a **running** phase whose heartbeat is older than STALE_AFTER has lost its worker. It is
   sent again with the rest of its chain (a loss, not an attempt: the next claim continues
   the attempt from its checkpoint), or, past LOST_LIMIT losses, failed with the reason.
   The row is the lock: one conditional UPDATE decides
   between several recoverers and a redelivered copy, so one copy runs the phase again.
2. a run whose phases are all done but which is still in flight lost its finish step: it
   is finished here (finish_run is idempotent).
3. a **pending** phase whose dependencies are done, of a run that showed no sign of life for
   STALE_AFTER, lost its message, or its message waits in the queue for a worker. Only a
   worker that has been idle for STALE_AFTER while consuming the pipeline's queue can tell
   the two apart (it would have received the message), so this rule needs ``idle_since``
   from such a worker (signals.py).

Workers run recover_stale() when they start and every STALE_AFTER/2 (signals.py);
services.start() and the init_status command run it too, without ``idle_since``.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import F
from django.utils import timezone

from . import dispatch, processes, tracing
from .conf import settings
from .models import IN_FLIGHT, PHASE_DONE, PhaseRun, PhaseState, PipelineRun
from .outcomes import backoff_ceiling, fail_phase, finish_run

logger = logging.getLogger("initpipeline")

RESENT = "resent"
FAILED = "failed"
FINISHED = "finished"
SEND_FAILED = "send_failed"


@dataclass(frozen=True)
class Recovered:
    """One thing recover_stale() did: ``action`` is resent, failed, finished or send_failed."""

    run_id: int
    phase: str | None
    action: str
    reason: str


def recover_stale(
    *, now: datetime | None = None, idle_since: datetime | None = None
) -> list[Recovered]:
    """Resume or fail the runs in flight that nothing works on; returns what it did.

    ``idle_since``: since when the calling worker has held no task at all while consuming
    the pipeline's queue (None when the caller is not such a worker). Safe to call from any
    number of processes at once.
    """
    now = now or timezone.now()
    stale_after = settings.STALE_AFTER
    cutoff = now - timedelta(seconds=stale_after)
    done: list[Recovered] = []
    for run in PipelineRun.objects.in_flight().order_by("pk"):
        phases = list(run.phases.order_by("position"))
        running = [p for p in phases if p.state == PhaseState.RUNNING]
        if running:
            for pr in running:
                if pr.heartbeat_age(now) >= stale_after:
                    found = _recover_running(run, pr, phases, now, cutoff)
                    if found is not None:
                        done.append(found)
            continue
        last = _last_activity(run, phases)
        if last >= cutoff:
            continue
        if all(p.state in PHASE_DONE for p in phases):
            found = _finish(run)
            if found is not None:
                done.append(found)
            continue
        by_name = {p.name: p for p in phases}
        for names in dispatch.plan_chains(phases):
            found = _recover_pending(run, by_name[names[0]], names, now, last, idle_since)
            if found is not None:
                done.append(found)
    for item in done:
        log = logger.error if item.action in (FAILED, SEND_FAILED) else logger.warning
        log("recovery: run %s, %s %s: %s", item.run_id, item.phase, item.action, item.reason)
    return done


def reclaim_from_gone(hostname: str, *, now: datetime | None = None) -> list[Recovered]:
    """A worker starting as ``hostname``: take back at once the phases still recorded as
    running under that name on this host whose process is gone.

    Node names are unique among live workers, so a worker that starts under a name outlived
    the one that had it (killed with its pool, Ctrl-C under honcho, a reboot): its phases
    are losses now, not after STALE_AFTER. A phase whose process still lives (a second
    worker wrongly started under the same name) is left to the usual rules.
    """
    if hostname.rpartition("@")[2] != socket.gethostname():
        return []
    now = now or timezone.now()
    done: list[Recovered] = []
    for pr in PhaseRun.objects.filter(
        state=PhaseState.RUNNING, worker=hostname, run__state__in=IN_FLIGHT
    ).select_related("run"):
        if pr.worker_pid and processes.alive(pr.worker_pid):
            continue
        reason = f"its worker {hostname} is gone: a worker started under its name"
        run = pr.run
        phases = list(run.phases.order_by("position"))
        if pr.out_of_losses:
            reason = f"{reason}; lost more often than LOST_LIMIT ({pr.max_losses}) allows"
            if fail_phase(pr, reason, ""):
                tracing.event(pr, tracing.LOST, error=reason, reason=reason, losses=pr.losses)
                done.append(Recovered(run.pk, pr.name, FAILED, reason))
            continue
        taken = PhaseRun.objects.owned(pr.pk, pr.lease).update(
            state=PhaseState.PENDING,
            losses=F("losses") + 1,
            interrupted=True,
            worker_pid=None,
            heartbeat_at=now,
            message=f"{reason}; sent again"[:500],
        )
        if taken:
            tracing.event(pr, tracing.LOST, reason=reason, losses=pr.losses + 1)
            done.append(_send(run, pr, _chain_from(pr, phases), reason))
    for item in done:
        logger.warning(
            "recovery: run %s, %s %s: %s", item.run_id, item.phase, item.action, item.reason
        )
    return done


def _last_activity(run: PipelineRun, phases: list[PhaseRun]) -> datetime:
    stamps = [run.created_at, run.started_at]
    for p in phases:
        stamps += [p.started_at, p.heartbeat_at, p.finished_at]
    return max(s for s in stamps if s is not None)


def _recover_running(
    run: PipelineRun, pr: PhaseRun, phases: list[PhaseRun], now: datetime, cutoff: datetime
) -> Recovered | None:
    reason = pr.lost_reason(now)
    if pr.out_of_losses:
        reason = f"{reason}; lost more often than LOST_LIMIT ({pr.max_losses}) allows"
        if fail_phase(pr, reason, "", stale_before=cutoff):
            tracing.event(pr, tracing.LOST, error=reason, reason=reason, losses=pr.losses)
            return Recovered(run.pk, pr.name, FAILED, reason)
        return None
    # The conditional UPDATE is the lock: it matches only while nobody claimed the phase
    # (the lease would have changed) and no copy heartbeated since we looked. A loss is
    # not an attempt: the next claim continues this one, from its checkpoint.
    taken = (
        PhaseRun.objects.owned(pr.pk, pr.lease)
        .stale(cutoff)
        .update(
            state=PhaseState.PENDING,
            losses=F("losses") + 1,
            interrupted=True,
            worker_pid=None,
            heartbeat_at=now,
            message=f"{reason}; sent again"[:500],
        )
    )
    if not taken:
        return None
    tracing.event(pr, tracing.LOST, reason=reason, losses=pr.losses + 1)
    return _send(run, pr, _chain_from(pr, phases), reason)


def _chain_from(pr: PhaseRun, phases: list[PhaseRun]) -> list[str]:
    """The chain to send again from ``pr``, just put back to pending."""
    for p in phases:
        if p.pk == pr.pk:
            p.state = PhaseState.PENDING
    chains = dispatch.plan_chains(phases, start=[pr.name])
    return chains[0] if chains else [pr.name]


def _recover_pending(
    run: PipelineRun,
    pr: PhaseRun,
    names: list[str],
    now: datetime,
    last: datetime,
    idle_since: datetime | None,
) -> Recovered | None:
    cutoff = now - timedelta(seconds=settings.STALE_AFTER)
    if pr.state != PhaseState.PENDING:
        return None
    if idle_since is None or idle_since > cutoff:
        return None
    if pr.attempt and not pr.interrupted and pr.heartbeat_at is not None:
        # A failed attempt waits for its retry, which the worker holds until its countdown
        # ends: allow the longest backoff before calling the retry lost.
        due = pr.heartbeat_at + timedelta(seconds=backoff_ceiling(pr.attempt))
        if due >= cutoff:
            return None
    reason = (
        f"no worker took phase {pr.name} for {(now - last).total_seconds():.0f} s while a worker "
        "was idle: its message was lost"
    )
    taken = (
        PhaseRun.objects.filter(pk=pr.pk, state=PhaseState.PENDING, lease=pr.lease)
        .stale(cutoff)
        .update(heartbeat_at=now, message=f"{reason}; sent again"[:500])
    )
    if not taken:
        return None
    return _send(run, pr, names, reason)


def _send(run: PipelineRun, pr: PhaseRun, names: list[str], reason: str) -> Recovered:
    try:
        dispatch.send_chain(run.pk, names)
    except Exception as exc:
        # The phase stays pending: an idle worker sends it once the broker is back.
        logger.exception("recovery: could not send run %s again from %s", run.pk, pr.name)
        PhaseRun.objects.filter(pk=pr.pk, state=PhaseState.PENDING).update(
            message=f"{reason}; could not send it again: {type(exc).__name__}: {exc}"[:500]
        )
        return Recovered(run.pk, pr.name, SEND_FAILED, f"{reason}; {type(exc).__name__}: {exc}")
    return Recovered(run.pk, pr.name, RESENT, f"{reason}; sent {', '.join(names)} again")


def _finish(run: PipelineRun) -> Recovered | None:
    generation = finish_run(run_id=run.pk)
    run.refresh_from_db()
    if run.is_in_flight:
        return None
    what = f"generation {generation.pk} active" if generation is not None else run.state
    return Recovered(
        run.pk, None, FINISHED, f"every phase was done but the run never ended: {what}"
    )


def hard_timeout(*, run_id: int, phase_name: str, task_id: str) -> Recovered | None:
    """The hard time limit killed a phase that ignored its soft limit: retry or fail it now.

    Without this the phase would count as lost once its heartbeat went stale; this says why.
    """
    pr = (
        PhaseRun.objects.filter(
            run_id=run_id, name=phase_name, state=PhaseState.RUNNING, task_id=task_id
        )
        .select_related("run")
        .first()
    )
    if pr is None or not pr.run.is_in_flight:
        return None
    reason = (
        f"timed out after {pr.timeout} s (hard time limit {dispatch.HARD_LIMIT_GRACE} s "
        "later: the phase did not stop at its soft limit)"
    )
    if pr.attempt >= pr.max_attempts:
        found = None
        if fail_phase(pr, reason, ""):
            found = Recovered(run_id, phase_name, FAILED, reason)
    else:
        taken = PhaseRun.objects.owned(pr.pk, pr.lease).update(
            state=PhaseState.PENDING,
            interrupted=False,
            worker_pid=None,
            error=reason,
            heartbeat_at=timezone.now(),
            message=f"attempt {pr.attempt} {reason}; sent again"[:500],
        )
        found = None
        if taken:
            phases = list(pr.run.phases.order_by("position"))
            found = _send(pr.run, pr, _chain_from(pr, phases), reason)
    if found is not None:
        logger.error("run %s, %s %s: %s", run_id, phase_name, found.action, found.reason)
    return found
