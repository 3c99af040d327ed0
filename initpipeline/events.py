"""Progress as Celery task events, sent by a thread of their own: never in a phase's way.

``task.send_event()`` takes a connection from the app's pool and publishes in the calling
thread: with the broker down it blocks each progress() call for the pool's retries
(about 6 s), and with a broker that accepts connections but never answers, for ever.
An event is worth losing, a phase is not: progress() puts the event on a short queue,
and one daemon thread per process sends them, dropping the oldest when it falls behind.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any

logger = logging.getLogger("initpipeline")

#: Events waiting to be sent; past this many the oldest are dropped.
BACKLOG = 100

_queue: queue.Queue[tuple[Any, str | None, str, dict[str, Any]]] = queue.Queue(BACKLOG)
_lock = threading.Lock()
_sender: threading.Thread | None = None


def send(app: Any, *, hostname: str | None, uuid: str, **fields: Any) -> None:
    """Queue a ``task-progress`` event of task ``uuid`` on worker ``hostname``; never blocks."""
    _start()
    item = (app, hostname, uuid, fields)
    while True:
        try:
            _queue.put_nowait(item)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                _queue.get_nowait()  # The oldest progress is the least worth sending.


def _start() -> None:
    global _sender
    if _sender is not None and _sender.is_alive():
        return
    with _lock:
        if _sender is None or not _sender.is_alive():
            _sender = threading.Thread(target=_run, name="initpipeline-events", daemon=True)
            _sender.start()


def _run() -> None:
    while True:
        app, hostname, uuid, fields = _queue.get()
        try:
            with app.events.default_dispatcher(hostname=hostname) as dispatcher:
                dispatcher.send("task-progress", uuid=uuid, retry=False, **fields)
        except Exception:
            logger.debug("could not send a task-progress event", exc_info=True)
