"""Settings of bench/serving.py: bench/serveapp's artifacts, on a var folder of their own."""

import os
from pathlib import Path

_BASE = Path(__file__).resolve().parent.parent
os.environ.setdefault("INITPIPELINE_VAR_DIR", str(_BASE / "var" / "bench-serving"))

from bench.settings import *  # noqa: E402,F403
from bench.settings import INITPIPELINE, INSTALLED_APPS  # noqa: E402

INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "project.search"] + ["bench.serveapp"]
ROOT_URLCONF = "bench.serveapp.urls"
INITPIPELINE = {
    **INITPIPELINE,
    "REQUIRED_ARTIFACTS": os.environ.get("BENCH_REQUIRED", "model").split(","),
    "LOCAL_CACHE_DIR": str(Path(os.environ["INITPIPELINE_VAR_DIR"]) / "cache"),
}
