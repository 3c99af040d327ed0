"""Settings of the benchmark processes: the demo project on its own var folder."""

import os
from pathlib import Path

_BASE = Path(__file__).resolve().parent.parent
os.environ.setdefault("INITPIPELINE_VAR_DIR", str(_BASE / "var" / "bench"))

from project.settings import *  # noqa: E402,F403
from project.settings import INITPIPELINE  # noqa: E402

ROOT_URLCONF = "bench.urls"
DEBUG = False
INITPIPELINE = {**INITPIPELINE, "REFRESH_INTERVAL": 2.0}
# Benchmarks measure the server, not the access log.
LOGGING = {"version": 1, "disable_existing_loggers": False}
