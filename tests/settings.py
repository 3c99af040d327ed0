"""Settings for the test suite and for the worker and CLI processes the tests start.

Every process of a test reads the same SQLite file (the test database) and the same
artifact folder, so a worker subprocess sees what the test wrote and the other way round.
"""

import os
from pathlib import Path

_BASE = Path(__file__).resolve().parent.parent
os.environ.setdefault("INITPIPELINE_VAR_DIR", str(_BASE / "var" / "test"))

from project.settings import *  # noqa: E402,F403
from project.settings import DATABASES, INITPIPELINE, INSTALLED_APPS  # noqa: E402

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not :memory:: worker subprocesses must open the same database.
    # Beside the var folder (which the suite empties at start), one per INITPIPELINE_VAR_DIR
    # so that several test sessions can run side by side.
    _VAR = Path(os.environ["INITPIPELINE_VAR_DIR"])
    _DB = str(_VAR.parent / f"{_VAR.name}-db.sqlite3")
    DATABASES["default"]["NAME"] = _DB
    DATABASES["default"]["TEST"] = {"NAME": _DB}

# "small": tests/testapp's fast, controllable pipeline; "demo": the real demo workload.
PIPELINE = os.environ.get("INITPIPELINE_TEST_PIPELINE", "small")
if PIPELINE == "small":
    INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "project.search"] + ["tests.testapp"]

INITPIPELINE = {
    **INITPIPELINE,
    "HEARTBEAT_INTERVAL": 0.5,
    "STALE_AFTER": 5.0,
    "RETRY_BACKOFF": 0.2,
    "RETRY_BACKOFF_MAX": 1.0,
    "REFRESH_INTERVAL": float(os.environ.get("INITPIPELINE_REFRESH_INTERVAL", "0.5")),
    "REQUIRED_ARTIFACTS": ["lsa_docs"] if PIPELINE == "demo" else ["b_out"],
    "RETRY_AFTER": 1,
    "START_ON_GUNICORN_READY": os.environ.get("INITPIPELINE_START_ON_READY") == "1",
}

ROOT_URLCONF = "tests.urls"

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Serve static files from the apps' folders (no collectstatic in tests).
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True
