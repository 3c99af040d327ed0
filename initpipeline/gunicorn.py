"""Gunicorn hooks: start the init from the master, and keep a worker alive during slow init.

Both are correct on Gunicorn 22+, where the worker heartbeat is
``os.utime(tmp, (monotonic(), monotonic()))``: the arbiter's watchdog only starts at a
worker's first ``notify()``, so a single early ``notify()`` followed by slow work gets the
worker killed with WORKER TIMEOUT (FIELD_NOTES, Gunicorn; benoitc/gunicorn#3242).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("initpipeline")


def start_init_when_ready(server: Any) -> subprocess.Popen[bytes] | None:
    """``when_ready`` hook: run ``start_init`` in a child process if the setting asks for it.

    A child process, not a call: the master stays free of Django's app registry, database
    connections and threads that its forked workers would inherit, and it spawns workers at
    once. Nothing here may raise: an exception in a Gunicorn hook stops the whole server.

    Gunicorn's master never imports the project's ``wsgi.py``, so it knows the settings
    only from ``DJANGO_SETTINGS_MODULE`` in its environment (``--env`` or the shell).
    """
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        # Without it the setting cannot be read: say so in one line, not a traceback.
        server.log.info(
            "initpipeline: DJANGO_SETTINGS_MODULE is not set in Gunicorn's environment, "
            "so START_ON_GUNICORN_READY is not read and the init is not started here"
        )
        return None
    try:
        from .conf import settings

        # Reading a setting imports the settings module only (no django.setup()).
        if not settings.START_ON_GUNICORN_READY:
            return None
        server.log.info("initpipeline: starting the init (START_ON_GUNICORN_READY)")
        return subprocess.Popen(
            [sys.executable, "-m", "django", "start_init"], env=os.environ.copy()
        )
    except Exception:
        server.log.exception("initpipeline: could not start the init from when_ready")
        return None


@contextmanager
def keep_alive(worker: Any, interval: float | None = None) -> Iterator[None]:
    """Notify Gunicorn's arbiter from a thread while the block runs (slow in-worker init).

    For sites that cannot move their init out of the worker yet::

        # gunicorn.conf.py
        def post_worker_init(worker):
            with keep_alive(worker):
                load_my_model()

    The watchdog still reaps a worker whose block truly hangs the whole process (a hung
    C extension holding the GIL starves this thread too).
    """
    period = interval if interval is not None else max(0.5, worker.timeout / 4)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(period):
            worker.notify()

    worker.notify()
    thread = threading.Thread(target=beat, name="initpipeline-gunicorn-keepalive", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        worker.notify()
