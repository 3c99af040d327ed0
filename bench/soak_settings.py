"""Settings of the soak (bench/soak.py): the demo project running bench/soakapp's pipeline."""

import os
from pathlib import Path

_BASE = Path(__file__).resolve().parent.parent
os.environ.setdefault("INITPIPELINE_VAR_DIR", str(_BASE / "var" / "soak"))

from project.settings import *  # noqa: E402,F403
from project.settings import INITPIPELINE, INSTALLED_APPS  # noqa: E402

INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "project.search"] + ["bench.soakapp"]
INITPIPELINE = {
    **INITPIPELINE,
    "REQUIRED_ARTIFACTS": ["checked"],
    # A killed worker is noticed in seconds, not a minute: the soak kills one every 1-2 min.
    "HEARTBEAT_INTERVAL": 1.0,
    "STALE_AFTER": 10.0,
}
