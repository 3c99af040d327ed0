"""The INITPIPELINE settings dict, merged over documented defaults, read through one typed object.

``from initpipeline.conf import settings``; ``settings.STALE_AFTER`` is a float. The merged
dict is cached and dropped on ``setting_changed``, so ``override_settings(INITPIPELINE=...)``
takes effect at once. Values are converted, not validated: checks.py reports bad ones
(``manage.py check``), before any command or worker runs.
"""

from __future__ import annotations

import functools
from typing import Any

from django.conf import settings as django_settings
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
    # A phase's progress() writes its record at most this often (seconds), and at 100 %.
    "PROGRESS_INTERVAL": 0.5,
    # A running phase whose heartbeat is older than this many seconds is stale.
    "STALE_AFTER": 60.0,
    # Times a phase may lose its worker (SIGKILL, OOM, a lost host) before the run fails.
    # A loss is not an attempt: retries= counts exceptions and timeouts only.
    "LOST_LIMIT": 3,
    # Seconds a worker shutting down (SIGTERM) gives its running phase to checkpoint and
    # hand itself back before the worker takes it back and exits.
    "HANDOFF_GRACE": 10.0,
    # Seconds a phase may wait for a worker running the code the run planned (a deploy
    # with old workers still up) before the run fails with that reason.
    "SKEW_TIMEOUT": 600.0,
    # Hard time limit of a phase that sets no timeout= of its own (seconds).
    "DEFAULT_TIMEOUT": 3600,
    # First retry waits this many seconds, doubling up to RETRY_BACKOFF_MAX (with jitter):
    # a phase's retries, and a web process's next try of a load that failed.
    "RETRY_BACKOFF": 5.0,
    "RETRY_BACKOFF_MAX": 600.0,
    # Celery queue for the phase tasks; None uses the default queue.
    "QUEUE": None,
    # Seconds each step of a send to the broker may take (connect, write, read); a send
    # tries three times, so a broker that never answers fails a send within about 3x this.
    "SEND_TIMEOUT": 5.0,
    # Seconds the warming-up responses ask clients to wait (Retry-After).
    "RETRY_AFTER": 5,
    # URL prefix -> artifact names, for WarmingUpMiddleware.
    "WARMUP_PATHS": {},
    # Delete the files of generations older than KEEP_GENERATIONS after each activation.
    "GC_AFTER_ACTIVATION": False,
    # Gunicorn's when_ready hook (project gunicorn.conf.py) runs start_init in a child process.
    "START_ON_GUNICORN_READY": False,
    # Dotted path of the project's Celery app ("project.celery.app"), imported the first
    # time a process sends a task. None: the app the project imports itself (Celery's
    # Django layout imports it in the project's __init__.py, which costs every web
    # process the import of Celery at start).
    "CELERY_APP": None,
    # The bearer token Prometheus sends to /init/metrics (Authorization: Bearer ...);
    # None: only staff who may see the init's details get the metrics (in a browser).
    "METRICS_TOKEN": None,
    # A series per shard of a sharded phase in the metrics, besides the phase's own; off:
    # a phase's shards are counted by state, so 1,000 shards are not 1,000 series a name.
    "METRICS_SHARDS": False,
    # Where a host keeps verified copies of artifacts from a remote storage (S3 and the
    # like), to memory-map them; None = "initpipeline-cache" in the system temp folder.
    "LOCAL_CACHE_DIR": None,
}


@functools.cache
def _merged() -> dict[str, Any]:
    user = getattr(django_settings, "INITPIPELINE", None)
    # Not a dict: initpipeline.E001 says so; meanwhile the defaults apply.
    return {**DEFAULTS, **(user if isinstance(user, dict) else {})}


@receiver(setting_changed)
def _clear(*, setting: str, **kwargs: Any) -> None:
    # override_settings(INITPIPELINE=...) in tests must take effect at once.
    if setting == "INITPIPELINE":
        _merged.cache_clear()


class Settings:
    """One typed attribute per setting (README "Settings" says what each one does)."""

    def raw(self, name: str) -> Any:
        """The value as given (or the default), unconverted: for the system checks."""
        if name not in DEFAULTS:
            raise KeyError(f"unknown INITPIPELINE setting {name!r}")
        return _merged()[name]

    @property
    def STORAGE(self) -> str:
        return str(self.raw("STORAGE"))

    @property
    def REFRESH_INTERVAL(self) -> float:
        return float(self.raw("REFRESH_INTERVAL"))

    @property
    def KEEP_GENERATIONS(self) -> int:
        return int(self.raw("KEEP_GENERATIONS"))

    @property
    def REQUIRED_ARTIFACTS(self) -> list[str]:
        return list(self.raw("REQUIRED_ARTIFACTS") or [])

    @property
    def HEARTBEAT_INTERVAL(self) -> float:
        return float(self.raw("HEARTBEAT_INTERVAL"))

    @property
    def PROGRESS_INTERVAL(self) -> float:
        return float(self.raw("PROGRESS_INTERVAL"))

    @property
    def STALE_AFTER(self) -> float:
        return float(self.raw("STALE_AFTER"))

    @property
    def LOST_LIMIT(self) -> int:
        return int(self.raw("LOST_LIMIT"))

    @property
    def HANDOFF_GRACE(self) -> float:
        return float(self.raw("HANDOFF_GRACE"))

    @property
    def SKEW_TIMEOUT(self) -> float:
        return float(self.raw("SKEW_TIMEOUT"))

    @property
    def DEFAULT_TIMEOUT(self) -> int:
        return int(self.raw("DEFAULT_TIMEOUT"))

    @property
    def RETRY_BACKOFF(self) -> float:
        return float(self.raw("RETRY_BACKOFF"))

    @property
    def RETRY_BACKOFF_MAX(self) -> float:
        return float(self.raw("RETRY_BACKOFF_MAX"))

    @property
    def QUEUE(self) -> str | None:
        value = self.raw("QUEUE")
        return str(value) if value else None

    @property
    def SEND_TIMEOUT(self) -> float:
        return float(self.raw("SEND_TIMEOUT"))

    @property
    def RETRY_AFTER(self) -> int:
        return int(self.raw("RETRY_AFTER"))

    @property
    def WARMUP_PATHS(self) -> dict[str, list[str]]:
        return {str(k): list(v) for k, v in (self.raw("WARMUP_PATHS") or {}).items()}

    @property
    def GC_AFTER_ACTIVATION(self) -> bool:
        return bool(self.raw("GC_AFTER_ACTIVATION"))

    @property
    def START_ON_GUNICORN_READY(self) -> bool:
        return bool(self.raw("START_ON_GUNICORN_READY"))

    @property
    def CELERY_APP(self) -> str | None:
        value = self.raw("CELERY_APP")
        return str(value) if value else None

    @property
    def METRICS_TOKEN(self) -> str | None:
        value = self.raw("METRICS_TOKEN")
        return str(value) if value else None

    @property
    def METRICS_SHARDS(self) -> bool:
        return bool(self.raw("METRICS_SHARDS"))

    @property
    def LOCAL_CACHE_DIR(self) -> str | None:
        value = self.raw("LOCAL_CACHE_DIR")
        return str(value) if value else None


settings = Settings()
