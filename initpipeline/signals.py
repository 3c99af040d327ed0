"""Recovery inside Celery workers: when a worker starts, every STALE_AFTER/2, after a hard
time limit.

Connected when tasks.py is imported: a worker imports it to find the tasks (Celery's
``autodiscover_tasks``, at its start, before it sends ``worker_init``), and a web process
never does, so it never imports Celery's worker stack. Nothing here runs outside a worker's
main process, but the end of a task's span (tracing.py), in the process that ran the task.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime
from typing import Any

from celery.signals import (
    task_failure,
    task_postrun,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)
from django.db import close_old_connections, connection
from django.utils import timezone

from . import dispatch, execution, outcomes, tracing
from .conf import settings
from .exceptions import PhaseSkipped
from .models import IN_FLIGHT, PhaseRun, PhaseState, PipelineRun
from .recovery import hard_timeout, reclaim_from_gone, recover_stale

logger = logging.getLogger("initpipeline")


class Watchdog(threading.Thread):
    """Runs recovery.recover_stale() in the worker's main process, every STALE_AFTER/2.

    It tells recovery since when this worker has been idle: holding no task at all
    (running, reserved or waiting for its countdown) while consuming the pipeline's queue.
    Such a worker would have received a phase's message, so a phase that stays pending
    meanwhile lost its message (recovery.py, rule 3).
    """

    def __init__(self, consumer: Any) -> None:
        super().__init__(name="initpipeline-watchdog", daemon=True)
        self.consumer = consumer
        self.stopped = threading.Event()
        self.idle_since: datetime | None = None

    def run(self) -> None:
        interval = max(settings.STALE_AFTER / 2, 0.1)
        while True:
            self.check()
            if self.stopped.wait(interval):
                return

    def check(self) -> None:
        now = timezone.now()
        if self.idle():
            self.idle_since = self.idle_since or now
        else:
            self.idle_since = None
        try:
            close_old_connections()
            recover_stale(now=now, idle_since=self.idle_since)
        except Exception:
            # A database or broker outage must not end the watchdog: it tries again.
            logger.exception("recovery check failed; trying again in a moment")
        finally:
            # Django connections are per thread: close this thread's own.
            connection.close()

    def idle(self) -> bool:
        from celery.worker import state

        if state.requests or state.active_requests or state.reserved_requests:
            return False
        queue = settings.QUEUE or self.consumer.app.conf.task_default_queue
        task_consumer = getattr(self.consumer, "task_consumer", None)
        if task_consumer is None:
            return False  # Not consuming right now (say, reconnecting to the broker).
        return any(q.name == queue for q in task_consumer.queues)

    def stop(self) -> None:
        self.stopped.set()


_watchdogs: list[Watchdog] = []


def start_watchdog(sender: Any = None, **kwargs: Any) -> None:
    """worker_ready: take back what a gone worker of this name held, then check at once and
    periodically, in a thread of the main process."""
    hostname = getattr(sender, "hostname", None)
    if hostname:
        try:
            reclaim_from_gone(str(hostname))
        except Exception:
            logger.exception("taking back the phases of a gone %s failed", hostname)
        finally:
            close_old_connections()
    dog = Watchdog(sender)
    _watchdogs.append(dog)
    dog.start()


def stop_watchdogs(**kwargs: Any) -> None:
    """worker_shutting_down: stop checking (a worker that is leaving is not idle)."""
    while _watchdogs:
        _watchdogs.pop().stop()


class HandOff(threading.Thread):
    """A worker shutting down gives its running phases back instead of waiting for them.

    On SIGTERM (warm shutdown) Celery waits for every running task, however long; past
    systemd's TimeoutStopSec or Kubernetes' grace period the phase is SIGKILLed and its
    work since the last checkpoint is lost anyway. So: ask each running phase of this
    worker for a hand-off (its next progress() or heartbeat() checkpoints and raises
    PhaseHandedOff, and it goes back to the queue); take back, after HANDOFF_GRACE, those
    that did not, and stop their pool processes, so that the worker exits within the grace.
    On a cold shutdown Celery stops the tasks itself: they are taken back at once.
    """

    def __init__(self, hostname: str, *, warm: bool) -> None:
        super().__init__(name="initpipeline-handoff", daemon=False)
        self.hostname = hostname
        self.warm = warm

    def run(self) -> None:
        try:
            close_old_connections()
            self.hand_off()
        except Exception:
            # The phases are then lost instead, and recovery resumes them (slower, safe).
            logger.exception("handing back the running phases of %s failed", self.hostname)
        finally:
            connection.close()

    def hand_off(self) -> None:
        mine = PhaseRun.objects.filter(
            state=PhaseState.RUNNING, worker=self.hostname, run__state__in=IN_FLIGHT
        )
        rows = list(mine.values_list("pk", "lease", "worker_pid"))
        if not rows:
            return
        mine.update(handoff_requested_at=timezone.now())
        logger.warning(
            "%s is shutting down: asking %d running phase(s) to hand themselves back",
            self.hostname,
            len(rows),
        )
        deadline = time.monotonic() + (settings.HANDOFF_GRACE if self.warm else 0.0)
        while rows and time.monotonic() < deadline:
            time.sleep(0.2)
            rows = [r for r in rows if PhaseRun.objects.owned(r[0], r[1]).exists()]
        for pk, lease, pid in rows:
            pr = PhaseRun.objects.filter(pk=pk, lease=lease).first()
            if pr is None:
                continue
            why = "taken back from its worker, which is shutting down"
            if self.warm:
                why += f" (the phase did not hand itself back within {settings.HANDOFF_GRACE:g} s)"
            try:
                outcomes.record_handed_off(pr, why)
            except PhaseSkipped:
                continue
            if self.warm and pid and _is_our_child(pid):
                # The worker waits for its pool processes: this one would run to the end.
                os.kill(pid, signal.SIGKILL)


def _is_our_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[1]) == os.getpid()


def hand_off(sender: Any = None, how: str = "Warm", **kwargs: Any) -> None:
    """worker_shutting_down (in the worker's main process): see HandOff."""
    if not isinstance(sender, str) or not sender:
        return
    try:
        # From now on this worker's pool processes claim nothing (execution.py).
        marker = execution.leaving_marker(sender)
        marker.touch()
        atexit.register(marker.unlink, missing_ok=True)
    except Exception:
        logger.exception("could not mark %s as shutting down", sender)
    # Registered after the marker's removal: atexit runs it first, while still marked.
    atexit.register(send_ready_phases, sender)
    HandOff(sender, warm=how == "Warm").start()


def send_ready_phases(hostname: str) -> None:
    """As a worker's main process exits: send again every phase that is ready to run.

    It covers the phases this worker handed back and the messages it took while shutting
    down (and left). A phase whose message still waits in the queue gets a second one:
    the claim on its row lets one copy run it, the other is skipped.
    """
    try:
        close_old_connections()
        for run in PipelineRun.objects.in_flight():
            phases = list(run.phases.order_by("position"))
            for names in dispatch.plan_chains(phases):
                dispatch.send_chain(run.pk, names)
                logger.info("%s, leaving: sent %s of run %s again", hostname, names[0], run.pk)
    except Exception:
        # The phases stay pending: an idle worker's recovery sends them (recovery.py).
        logger.exception("%s, leaving: could not send the ready phases again", hostname)
    finally:
        connection.close()


def forget_leaving(sender: Any = None, **kwargs: Any) -> None:
    """worker_init: clear the shutdown marks of worker processes that are gone (a mark
    names one worker process; a later one with the same node name was never marked)."""
    try:
        execution.forget_gone_workers()
    except Exception:
        logger.exception("could not clear the shutdown marks of gone workers")


def leave_the_process_group(**kwargs: Any) -> None:
    """worker_process_init (in each pool process): leave the worker's process group, and
    die with the worker's main process.

    honcho, foreman, supervisord's ``stopasgroup`` and a terminal's Ctrl-C signal the whole
    process group: the pool processes would die beside their parent, with the phases they
    run, before the main process could ask those phases to hand themselves back. Out of
    the group, only the main process gets the signal and hands them back (HandOff); and
    should it be killed, the kernel kills its pool processes too (PR_SET_PDEATHSIG), as the
    group signal would have.
    """
    try:
        os.setpgid(0, 0)
    except OSError:
        return  # Already a group's leader (a solo pool's main process), or not allowed.
    _die_with_parent()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
        return
    if os.getppid() == 1:
        os._exit(1)  # The parent died before prctl(): nothing would kill us later.


def on_task_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    **kwargs: Any,
) -> None:
    """task_failure: a phase killed by its hard time limit is retried or failed at once.

    Celery sends it from the worker's main process after killing the pool process, so no
    code of ours ran in the phase's own process to record the timeout.
    """
    if getattr(sender, "name", None) != "initpipeline.run_phase":
        return
    if type(exception).__name__ != "TimeLimitExceeded" or not args or len(args) != 2:
        return
    try:
        hard_timeout(run_id=int(args[0]), phase_name=str(args[1]), task_id=task_id or "")
    except Exception:
        # Recovery still finds the phase once its heartbeat is stale.
        logger.exception("recording the hard time limit of %s failed", args[1])
    finally:
        close_old_connections()


def trace_task_end(
    sender: Any = None,
    task_id: str | None = None,
    retval: Any = None,
    state: str | None = None,
    **kwargs: Any,
) -> None:
    """task_postrun: the task's span (tracing.py) ends with its outcome."""
    if getattr(sender, "name", None) in (dispatch.RUN_PHASE, dispatch.FINISH_RUN):
        tracing.task_ended(task_id or "", state=state or "", retval=retval)


worker_ready.connect(start_watchdog, dispatch_uid="initpipeline.start_watchdog", weak=False)
task_failure.connect(on_task_failure, dispatch_uid="initpipeline.on_task_failure", weak=False)
worker_shutting_down.connect(stop_watchdogs, dispatch_uid="initpipeline.stop_watchdogs", weak=False)
worker_shutting_down.connect(hand_off, dispatch_uid="initpipeline.hand_off", weak=False)
worker_init.connect(forget_leaving, dispatch_uid="initpipeline.forget_leaving", weak=False)
worker_process_init.connect(
    leave_the_process_group, dispatch_uid="initpipeline.leave_the_process_group", weak=False
)
task_postrun.connect(trace_task_end, dispatch_uid="initpipeline.trace_task_end", weak=False)
