"""Settings for the test suite and for the worker and CLI processes the tests start.

Every process of a test reads the same database (an SQLite file, or a PostgreSQL database
with DATABASE_URL) and the same artifact storage, so a worker subprocess sees what the
test wrote and the other way round.
"""

import json
import os
from pathlib import Path

_BASE = Path(__file__).resolve().parent.parent
os.environ.setdefault("INITPIPELINE_VAR_DIR", str(_BASE / "var" / "test"))

from project.settings import *  # noqa: E402,F403
from project.settings import DATABASES, INITPIPELINE, INSTALLED_APPS, STORAGES  # noqa: E402

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not :memory:: worker subprocesses must open the same database.
    # Beside the var folder (which the suite empties at start), one per INITPIPELINE_VAR_DIR
    # so that several test sessions can run side by side.
    _VAR = Path(os.environ["INITPIPELINE_VAR_DIR"])
    _DB = str(_VAR.parent / f"{_VAR.name}-db.sqlite3")
    DATABASES["default"]["NAME"] = _DB
    DATABASES["default"]["TEST"] = {"NAME": _DB}
    # How long a process waits for SQLite's write lock (a test of a locked database).
    _TIMEOUT = os.environ.get("INITPIPELINE_TEST_DB_TIMEOUT")
    if _TIMEOUT:
        DATABASES["default"]["OPTIONS"] = {
            **DATABASES["default"]["OPTIONS"],
            "timeout": float(_TIMEOUT),
        }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # DATABASE_URL=postgres://...: the test database is the database itself, so that
    # pytest-django creates it and the worker and CLI subprocesses (which read these
    # settings, not pytest-django's) open the same one. One per INITPIPELINE_VAR_DIR.
    _VAR = Path(os.environ["INITPIPELINE_VAR_DIR"])
    _NAME = "test_initpipeline_" + "".join(c if c.isalnum() else "_" for c in _VAR.name)
    DATABASES["default"]["NAME"] = _NAME
    DATABASES["default"]["TEST"] = {"NAME": _NAME}

# "small": tests/testapp's fast, controllable pipeline a -> b -> c; "parallel":
# tests/parallelapp's two independent branches and their join; "code": tests/codeapp's
# x -> y -> z, whose source the tests rewrite; "shards": tests/shardapp's sharded phase;
# "merge": tests/mergeapp's sharded phase with a merge of its own; "demo": the real demo
# workload.
PIPELINE = os.environ.get("INITPIPELINE_TEST_PIPELINE", "small")
_APPS = {
    "small": ["tests.testapp"],
    "parallel": ["tests.parallelapp"],
    "code": ["tests.codeapp"],
    "shards": ["tests.shardapp"],
    # tests/test_shards.py: a sharded phase with a merge= of its own.
    "merge": ["tests.mergeapp"],
    # tests/test_hosts.py: parallel phases and a sharded one, over several hosts.
    "hosts": ["tests.parallelapp", "tests.shardapp"],
    # tests/test_serving.py: artifacts with loaders, published by the tests themselves.
    "serving": ["tests.servingapp"],
}
if PIPELINE in _APPS:
    INSTALLED_APPS = [a for a in INSTALLED_APPS if a != "project.search"] + _APPS[PIPELINE]
_REQUIRED = {
    "demo": ["lsa_docs"],
    "parallel": ["join_out"],
    "code": ["z_out"],
    "shards": ["total"],
    "merge": ["report"],
    "hosts": ["join_out", "total"],
    "serving": ["model"],
}

INITPIPELINE = {
    **INITPIPELINE,
    "HEARTBEAT_INTERVAL": 0.5,
    "STALE_AFTER": 5.0,
    "RETRY_BACKOFF": 0.2,
    "RETRY_BACKOFF_MAX": 1.0,
    "REFRESH_INTERVAL": float(os.environ.get("INITPIPELINE_REFRESH_INTERVAL", "0.5")),
    "REQUIRED_ARTIFACTS": _REQUIRED.get(PIPELINE, ["b_out"]),
    "RETRY_AFTER": 1,
    "HANDOFF_GRACE": 2.0,
    "LOST_LIMIT": int(os.environ.get("INITPIPELINE_TEST_LOST_LIMIT", "3")),
    "SKEW_TIMEOUT": float(os.environ.get("INITPIPELINE_TEST_SKEW_TIMEOUT", "600")),
    "START_ON_GUNICORN_READY": os.environ.get("INITPIPELINE_START_ON_READY") == "1",
    # Downloads of remote artifacts stay in this session's folder, not the shared temp one.
    "LOCAL_CACHE_DIR": os.environ.get(
        "INITPIPELINE_TEST_CACHE_DIR", str(Path(os.environ["INITPIPELINE_VAR_DIR"]) / "cache")
    ),
    # What a test's worker and CLI processes need on top (QUEUE, STALE_AFTER, ...), as JSON.
    **json.loads(os.environ.get("INITPIPELINE_TEST_SETTINGS") or "{}"),
}


def s3_storage(endpoint: str, bucket: str, **options: object) -> dict[str, object]:
    """A STORAGES entry for the artifacts on an S3 server at ``endpoint`` (moto in the tests)."""
    return {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "endpoint_url": endpoint,
            "bucket_name": bucket,
            "access_key": "testing",
            "secret_key": "testing",
            "region_name": "us-east-1",
            "addressing_style": "path",
            **options,
        },
    }


# Artifacts on S3 for the worker subprocesses of tests/test_backends_s3.py.
if os.environ.get("INITPIPELINE_TEST_S3_ENDPOINT"):
    STORAGES = {
        **STORAGES,
        "initpipeline": s3_storage(
            os.environ["INITPIPELINE_TEST_S3_ENDPOINT"], os.environ["INITPIPELINE_TEST_S3_BUCKET"]
        ),
    }

ROOT_URLCONF = "tests.urls"

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Serve static files from the apps' folders (no collectstatic in tests).
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True

# tests/test_tracing.py: every process of the test traces, as in a project that configured
# OpenTelemetry (tests/tracing_setup.py).
if os.environ.get("INITPIPELINE_TEST_TRACING"):
    from tests.tracing_setup import install

    install(os.environ["INITPIPELINE_TEST_TRACING"])
