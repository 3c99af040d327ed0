"""Settings of the bench's large-artifact figures: the demo project running bench/bigapp."""

import os
from pathlib import Path

_BASE = Path(__file__).resolve().parent.parent
os.environ.setdefault("INITPIPELINE_VAR_DIR", str(_BASE / "var" / "bench-big"))

from bench.settings import *  # noqa: E402,F403
from bench.settings import INITPIPELINE, INSTALLED_APPS  # noqa: E402

INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "project.search"] + ["bench.bigapp"]
INITPIPELINE = {
    **INITPIPELINE,
    "REQUIRED_ARTIFACTS": ["big_model"],
    # BENCH_CACHE_DIR: a host's records of what it verified; a fresh folder is a fresh host.
    "LOCAL_CACHE_DIR": os.environ.get("BENCH_CACHE_DIR") or None,
}
