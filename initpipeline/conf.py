"""The INITPIPELINE settings dict, merged over documented defaults and read lazily."""

from __future__ import annotations

import functools
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

#: Every key a project may set in ``settings.INITPIPELINE``; README.md documents each one.
DEFAULTS: dict[str, Any] = {
    # Alias in settings.STORAGES that holds the artifacts.
    "STORAGE": "initpipeline",
    # Seconds between two looks at the active generation in one web process.
    "REFRESH_INTERVAL": 2.0,
    # Generations whose files are kept on disk (the active one included).
    "KEEP_GENERATIONS": 3,
    # Artifacts /init/readyz waits for; empty means every artifact of the pipeline.
    "REQUIRED_ARTIFACTS": [],
    # Seconds between two heartbeats of a running phase.
    "HEARTBEAT_INTERVAL": 5.0,
    # A running phase whose heartbeat is older than this many seconds is stale.
    "STALE_AFTER": 60.0,
    # Hard time limit of a phase that sets no timeout= of its own (seconds).
    "DEFAULT_TIMEOUT": 3600,
    # First retry waits this many seconds, doubling up to RETRY_BACKOFF_MAX (with jitter).
    "RETRY_BACKOFF": 5.0,
    "RETRY_BACKOFF_MAX": 600.0,
    # Celery queue for the phase tasks; None uses the default queue.
    "QUEUE": None,
    # Seconds the warming-up responses ask clients to wait (Retry-After).
    "RETRY_AFTER": 5,
    # URL prefix -> artifact names, for WarmingUpMiddleware.
    "WARMUP_PATHS": {},
    # Delete the files of generations older than KEEP_GENERATIONS after each activation.
    "GC_AFTER_ACTIVATION": False,
    # Gunicorn's when_ready hook (project gunicorn.conf.py) runs start_init in a child process.
    "START_ON_GUNICORN_READY": False,
    # Where a host keeps verified copies of artifacts from a remote storage (S3 and the
    # like), to memory-map them; None = "initpipeline-cache" in the system temp folder.
    "LOCAL_CACHE_DIR": None,
}


@functools.cache
def get(name: str) -> Any:
    """Return one setting: the project's value if set, else the default."""
    if name not in DEFAULTS:
        raise KeyError(f"unknown INITPIPELINE setting {name!r}")
    user = getattr(settings, "INITPIPELINE", None) or {}
    if not isinstance(user, dict):
        return DEFAULTS[name]
    return user.get(name, DEFAULTS[name])


@receiver(setting_changed)
def _clear(*, setting: str, **kwargs: Any) -> None:
    # override_settings(INITPIPELINE=...) in tests must take effect at once.
    if setting == "INITPIPELINE":
        get.cache_clear()
