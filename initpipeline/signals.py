"""Recovery inside Celery workers: when a worker starts, every STALE_AFTER/2, after a hard
time limit.

Connected from AppConfig.ready(); nothing here runs outside a worker's main process.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from celery.signals import task_failure, worker_ready, worker_shutting_down
from django.db import close_old_connections, connection
from django.utils import timezone

from .conf import settings
from .recovery import hard_timeout, recover_stale

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
    """worker_ready: check at once, then periodically, in a thread of the main process."""
    dog = Watchdog(sender)
    _watchdogs.append(dog)
    dog.start()


def stop_watchdogs(**kwargs: Any) -> None:
    """worker_shutting_down: stop checking (a worker that is leaving is not idle)."""
    while _watchdogs:
        _watchdogs.pop().stop()


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


worker_ready.connect(start_watchdog, dispatch_uid="initpipeline.start_watchdog", weak=False)
task_failure.connect(on_task_failure, dispatch_uid="initpipeline.on_task_failure", weak=False)
worker_shutting_down.connect(stop_watchdogs, dispatch_uid="initpipeline.stop_watchdogs", weak=False)
