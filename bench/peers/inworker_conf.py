"""Peer "in-worker": each worker runs the phases in post_worker_init, kept alive by a thread."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
worker_class = "gthread"
threads = 4


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    from bench.plain import run_phases
    from initpipeline.gunicorn import keep_alive

    with keep_alive(worker):
        run_phases(Path(tempfile.mkdtemp(prefix="inworker-")))
