"""Gunicorn settings for a site whose slow start-up runs in Celery, not in the web workers.

Use it as it is::

    gunicorn mysite.wsgi -c python:initpipeline.gunicorn_conf

or start your own ``gunicorn.conf.py`` with ``from initpipeline.gunicorn_conf import *``
and add to it. Options on the command line win over these (``--workers 4``). Gunicorn's
own defaults stay for the rest: it binds ``127.0.0.1:8000`` (``0.0.0.0:$PORT`` when
``PORT`` is set) and runs ``$WEB_CONCURRENCY`` workers (else 1).

Why these values:

- The init never runs in a web worker, so a worker boots in about a second and the
  default short ``timeout`` stays right: it still reaps a worker that truly hangs.
- gthread: the main loop heartbeats every second whatever a request does, so the first
  request that maps and checksums an artifact cannot get its worker killed, and the other
  threads keep answering probes meanwhile (a sync worker dies when one request outlasts
  ``timeout``).
- No preload: the socket is bound at once and connections queue while workers import
  the app; with ``--preload`` nothing answers until the master has imported everything.
- Each worker loads its artifacts in a background thread (``post_worker_init``), records
  what it serves for the server's readiness, and is forgotten when it ends
  (``worker_exit``, ``child_exit``): no request waits for a load.
- ``on_starting`` empties prometheus-client's multiprocess folder when
  ``PROMETHEUS_MULTIPROC_DIR`` is set (the workers' load metrics, README "Monitoring"), and
  ``child_exit`` forgets the live gauges of a worker that ended.
- No ``max_requests``: a recycled worker would only pay the artifact load again.
- ``when_ready`` runs ``start_init`` in a child process when
  ``INITPIPELINE["START_ON_GUNICORN_READY"]`` is true, and otherwise does nothing; it
  never raises (an exception in a hook stops the whole server).
"""

from __future__ import annotations

from .gunicorn import (
    child_exit,
    on_starting,
    post_worker_init,
    start_init_when_ready,
    worker_exit,
)

__all__ = [
    "child_exit",
    "graceful_timeout",
    "keepalive",
    "on_starting",
    "post_worker_init",
    "threads",
    "timeout",
    "when_ready",
    "worker_class",
    "worker_exit",
]

worker_class = "gthread"
threads = 4
timeout = 30
graceful_timeout = 30
keepalive = 5
when_ready = start_init_when_ready
