"""Gunicorn settings for a site whose slow start-up runs in Celery, not in the workers.

Why these values:
- The init never runs in a worker, so a worker boots in about a second and the default
  short timeout stays right: it still reaps a worker that truly hangs.
- gthread: the main loop heartbeats every second whatever a request does, so the first
  request that maps and checksums an artifact cannot get its worker killed, and the other
  threads keep answering probes meanwhile (sync workers die when one request exceeds
  --timeout; FIELD_NOTES, Gunicorn).
- No preload: the socket is bound at once and connections queue while workers import the
  app; with --preload nothing answers until the master has imported everything.
- max_requests is left off: workers are cheap to keep, and a recycled worker would only
  pay the artifact load again.
"""

import os

# The master reads settings in when_ready; workers load project.wsgi, which sets it too.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

bind = os.environ.get("GUNICORN_BIND", f"127.0.0.1:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 30
keepalive = 5
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-")
errorlog = "-"


def when_ready(server):  # type: ignore[no-untyped-def]
    # Starts the init (single flight, like start_init) when INITPIPELINE["START_ON_GUNICORN_READY"]
    # is set; the deploy's release step is the better place when you have one.
    from initpipeline.gunicorn import start_init_when_ready

    start_init_when_ready(server)
