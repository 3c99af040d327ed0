"""Gunicorn hooks: start the init from the master, serve in the background in each worker,
and keep a worker alive during slow work.

Both are correct on Gunicorn 22+, where the worker heartbeat is
``os.utime(tmp, (monotonic(), monotonic()))``: the arbiter's watchdog only starts at a
worker's first ``notify()``, so a single early ``notify()`` followed by slow work gets the
worker killed with WORKER TIMEOUT (FIELD_NOTES, Gunicorn; benoitc/gunicorn#3242).
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import signal
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


# -- serving in the background -------------------------------------------------------------


#: Gunicorn's exit code of a worker that could not boot (Arbiter.WORKER_BOOT_ERROR): the
#: arbiter halts the whole server on it.
WORKER_BOOT_ERROR = 3


def post_worker_init(worker: Any) -> None:
    """``post_worker_init`` hook: this worker loads its artifacts in a background thread.

    When other workers of the server already serve (this one replaces a worker that
    died), it loads before it takes its first connection: its siblings serve meanwhile,
    and no request of this worker ever answers "warming up". At a server's start, it
    takes connections at once and answers "warming up" until loaded. A bad setting or
    pipeline stops the server here with one line (a worker that cannot boot halts it);
    nothing else here may raise.
    """
    from django.core.exceptions import ImproperlyConfigured

    try:
        from . import checks

        checks.refuse_to_serve()
    except ImproperlyConfigured as exc:
        # One line, and Gunicorn's "Worker failed to boot": the exit code of a worker that
        # cannot boot halts the server, instead of a 500 on every request.
        worker.log.error("initpipeline: %s", exc)
        sys.exit(WORKER_BOOT_ERROR)
    try:
        from . import servers, serving
        from .processes import alive

        servers.ServerFolder.prune()
        folder = servers.ServerFolder(worker.ppid)
        reporter = servers.Reporter(folder)

        def before(repo: serving.Repository) -> None:
            repo.server_folder = folder
            repo.replace_me = lambda: os.kill(os.getpid(), signal.SIGTERM)
            repo.listeners.append(reporter)
            reporter.set_state(servers.BOOTING, repo)
            if folder.others_serve(os.getpid()):
                worker.log.info("initpipeline: loading artifacts before taking connections")
                repo.load_before_serving()

        repo = serving.start(heartbeat=lambda: heartbeat_process(worker), before=before)
        _on_exit_signals(reporter.leaving)
        reporter.set_state(servers.SERVING, repo)
        # The worker that made way for this one (swap="new-worker") gave the server its
        # turn: the next may go once this one serves (and counts as serving, above).
        turn = folder.turn()
        if turn is not None and not alive(int(turn.get("pid") or 0)):
            folder.give_turn_back()
    except Exception:
        worker.log.exception("initpipeline: could not start serving in the background")


def worker_exit(server: Any, worker: Any) -> None:
    """``worker_exit`` hook: stop the loader and forget this worker."""
    try:
        from . import servers, serving

        repo = serving.repository()
        if repo is None:
            return
        for listener in repo.listeners:
            if isinstance(listener, servers.Reporter):
                listener.forget()
        serving.stop()
    except Exception:
        server.log.exception("initpipeline: could not stop serving")


def child_exit(server: Any, worker: Any) -> None:
    """``child_exit`` hook (in the master): remove the file of a worker that ended, killed
    or not, so that its siblings' readiness stops counting it at once; and its live
    gauges in prometheus-client's multiprocess folder (its counters stay: they count what
    it did)."""
    try:
        from .servers import ServerFolder

        ServerFolder(os.getpid()).remove(worker.pid)
    except Exception:
        server.log.exception("initpipeline: could not forget worker %s", worker.pid)
    if os.environ.get(MULTIPROC_ENV):
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
        except Exception:
            server.log.exception("initpipeline: could not forget the metrics of %s", worker.pid)


#: prometheus-client's multiprocess folder (FIELD_NOTES: set in the environment before
#: Gunicorn starts, so that every worker has it before it imports prometheus-client).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def on_starting(server: Any) -> None:
    """``on_starting`` hook (the master, before any worker): empty prometheus-client's
    multiprocess folder, creating it if needed.

    Its files are the counters of this server's workers; those of an earlier server would
    be added to them. One folder per Gunicorn server, then. Without the folder, a scrape
    of /init/metrics counts the loads of the worker that answers only: said once here.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        workers = int(getattr(getattr(server, "cfg", None), "workers", 1) or 1)
        if workers > 1 and importlib.util.find_spec("prometheus_client") is not None:
            server.log.info(
                "initpipeline: %s is not set, so the artifact load metrics of "
                "/init/metrics are those of the worker that answers, not of the server",
                MULTIPROC_ENV,
            )
        return
    try:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    except OSError:
        server.log.exception("initpipeline: could not empty %s (%s)", MULTIPROC_ENV, path)


def _on_exit_signals(callback: Any) -> None:
    """Call ``callback`` first when Gunicorn asks this worker to stop, then Gunicorn's own
    handler: a leaving worker takes no part in its server's readiness any more."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(signum)

        def handler(number: int, frame: Any, previous: Any = previous) -> None:
            callback()
            if callable(previous):
                previous(number, frame)

        signal.signal(signum, handler)


#: The longest a load may hold the GIL before Gunicorn's arbiter may take the worker for
#: hung (seconds): beyond it, the heartbeat process stops beating.
HEARTBEAT_LIMIT = 3600.0

_HEARTBEAT = """
import os, select, sys, time
fd, period, limit = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + limit
while time.monotonic() < end:
    # Standard input closes when the load ends or the worker dies: stop beating then.
    if select.select([0], [], [], period)[0]:
        break
    now = time.monotonic()
    os.utime(fd, (now, now))
"""


@contextmanager
def heartbeat_process(worker: Any, limit: float = HEARTBEAT_LIMIT) -> Iterator[None]:
    """Beat Gunicorn's heartbeat for ``worker`` from another process while the block runs.

    The arbiter kills a worker whose heartbeat file is older than ``timeout``. A thread
    cannot keep it fresh while a loader holds the GIL (json of gigabytes, a C extension
    that never releases it): the worker's own loop is stopped too, and a 60-s load would
    get the worker killed, loaded again by its successor, killed again... A child process
    needs no GIL: it writes the heartbeat file (inherited, written as Gunicorn's own
    ``WorkerTmp.notify()`` does) every ``timeout / 4`` seconds until the block ends.
    """
    tmp = getattr(worker, "tmp", None)
    if tmp is None:
        yield
        return
    period = max(0.25, float(worker.timeout or 30) / 4)
    fd = tmp.fileno()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _HEARTBEAT, str(fd), str(period), str(limit)],
            stdin=subprocess.PIPE,
            pass_fds=(fd,),
        )
    except OSError:
        logger.warning("initpipeline: cannot start the heartbeat process", exc_info=True)
        yield
        return
    try:
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()
