"""Phase progress reaches Flower and `celery events` as task events."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from celery import Celery

from tests.conftest import Stack

pytestmark = [pytest.mark.slow]


@pytest.mark.parametrize("stack", ["redis"], indirect=True)
def test_progress_is_sent_as_task_progress_events(stack: Stack) -> None:
    # set_as_current=False: the project's app must stay Celery's current app for later tests.
    monitor = Celery(broker=stack.env["CELERY_BROKER_URL"], set_as_current=False)
    events: list[dict[str, Any]] = []
    listening = threading.Event()

    def capture() -> None:
        with monitor.connection_for_read() as conn:

            def on_progress(event: dict[str, Any]) -> None:
                events.append(event)
                if len(events) == 4:
                    receiver.should_stop = True

            receiver = monitor.events.Receiver(conn, handlers={"task-progress": on_progress})
            listening.set()
            # limit=None: capture's limit counts every event, worker heartbeats included.
            receiver.capture(limit=None, timeout=60, wakeup=False)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    assert listening.wait(10)
    stack.start_worker()
    stack.control(sleep={"a": 2})
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr
    thread.join(timeout=30)
    assert len(events) == 4, events
    first = events[0]
    assert first["phase"] == "a"
    assert first["total"] == 20
    assert 1 <= first["done"] <= 20
    assert first["message"].startswith("step ")
    assert first["uuid"]  # the task id, which Flower groups events by


def test_a_broker_that_never_answers_does_not_slow_progress() -> None:
    """progress() only queues the event; a thread of its own sends it (events.py)."""
    import time

    from initpipeline import events
    from tests.servers import SilentServer

    silent = SilentServer()
    silent.start()
    try:
        hung = Celery(broker=f"redis://127.0.0.1:{silent.port}/0", set_as_current=False)
        started = time.monotonic()
        for n in range(3 * events.BACKLOG):
            events.send(hung, hostname="w@h", uuid="t", phase="a", done=n, total=None)
        # Every call returned at once: the sender thread is the one stuck on the broker,
        # and the backlog stays bounded.
        assert events._queue.qsize() <= events.BACKLOG
        assert time.monotonic() - started < 30  # blocking would mean for ever: no clock race
    finally:
        silent.stop()
