"""System checks: settings and pipeline errors (E001...), deployment warnings (W001...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core import checks

from . import conf
from .exceptions import PipelineConfigError

_NUMBERS = (
    "REFRESH_INTERVAL",
    "HEARTBEAT_INTERVAL",
    "STALE_AFTER",
    "DEFAULT_TIMEOUT",
    "RETRY_BACKOFF",
    "RETRY_BACKOFF_MAX",
    "RETRY_AFTER",
)


@checks.register()
def check_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    errors: list[Any] = []
    user = getattr(settings, "INITPIPELINE", {})
    if not isinstance(user, dict):
        return [
            checks.Error(
                f"settings.INITPIPELINE must be a dict, not {type(user).__name__}.",
                id="initpipeline.E001",
            )
        ]
    unknown = sorted(set(user) - set(conf.DEFAULTS))
    if unknown:
        errors.append(
            checks.Error(
                f"settings.INITPIPELINE has unknown keys: {', '.join(unknown)}.",
                hint=f"Known keys: {', '.join(sorted(conf.DEFAULTS))}.",
                id="initpipeline.E001",
            )
        )
    for key in _NUMBERS:
        value = conf.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            errors.append(
                checks.Error(
                    f"INITPIPELINE[{key!r}] must be a positive number, not {value!r}.",
                    id="initpipeline.E001",
                )
            )
    keep = conf.get("KEEP_GENERATIONS")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        errors.append(
            checks.Error(
                f"INITPIPELINE['KEEP_GENERATIONS'] must be an integer >= 1, not {keep!r}.",
                id="initpipeline.E001",
            )
        )
    alias = conf.get("STORAGE")
    if alias not in getattr(settings, "STORAGES", {}):
        errors.append(
            checks.Error(
                f"settings.STORAGES has no {alias!r} entry for the artifacts.",
                hint='Add STORAGES["initpipeline"] = {"BACKEND": '
                '"django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": ...}}.',
                id="initpipeline.E007",
            )
        )
    return errors


@checks.register()
def check_pipeline(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    from .registry import get_pipeline

    try:
        pipeline = get_pipeline()
    except PipelineConfigError as exc:
        return [checks.Error(str(exc), id="initpipeline.E009")]
    required = conf.get("REQUIRED_ARTIFACTS") or []
    errors: list[Any] = [
        checks.Error(p.msg, hint=p.hint, obj=p.obj, id=p.id) for p in pipeline.problems()
    ]
    for name in required:
        if name not in pipeline.producer:
            errors.append(
                checks.Error(
                    f"INITPIPELINE['REQUIRED_ARTIFACTS'] names {name!r}, which no phase produces.",
                    id="initpipeline.E008",
                )
            )
    return errors


# -- warnings about the deployment (initpipeline.W001...) ---------------------------------

#: Phases allowed to run this long (seconds) before early acks are worth a warning.
LONG_PHASE = 300
_REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")


def _longest_limit() -> int | None:
    """The longest a phase task may run: the largest timeout plus the hard limit's grace."""
    from .registry import get_pipeline
    from .services import HARD_LIMIT_GRACE

    try:
        phases = get_pipeline().phases.values()
    except PipelineConfigError:
        return None  # initpipeline.E009 reports it.
    if not phases:
        return None
    default = int(conf.get("DEFAULT_TIMEOUT"))
    return max(int(p.timeout or default) for p in phases) + HARD_LIMIT_GRACE


def _phase_acks_late(celery_conf: Any) -> bool:
    """Whether phase tasks are acknowledged late, as the worker will apply it.

    run_phase sets acks_late itself, which wins over task_acks_late; only task_annotations
    can change it for the task.
    """
    from .tasks import PHASE_TASK_OPTIONS

    value = PHASE_TASK_OPTIONS.get("acks_late")
    annotations = celery_conf.task_annotations or []
    if isinstance(annotations, dict):
        annotations = [annotations]
    for annotation in annotations:
        if isinstance(annotation, dict):
            for key in ("*", "initpipeline.run_phase"):
                entry = annotation.get(key)
                if isinstance(entry, dict) and "acks_late" in entry:
                    value = entry["acks_late"]
    if value is None:
        value = celery_conf.task_acks_late
    return bool(value)


@checks.register()
def check_celery(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """Celery settings that lose or duplicate phases (read from celery.current_app)."""
    from celery import current_app

    celery_conf = current_app.conf
    warnings: list[Any] = []
    url = str(celery_conf.broker_url or "")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    longest = _longest_limit()

    if scheme in _REDIS_SCHEMES and longest is not None:
        options = celery_conf.broker_transport_options or {}
        visibility = float(options.get("visibility_timeout", 3600))
        retry_wait = float(conf.get("RETRY_BACKOFF_MAX"))
        needed = max(longest, retry_wait)
        if visibility <= needed:
            warnings.append(
                checks.Warning(
                    f"Redis visibility_timeout ({visibility:g} s) is not longer than the "
                    f"longest a phase task stays unacknowledged ({needed:g} s: its timeout "
                    "plus the hard limit's grace, or a retry's countdown).",
                    hint="Redis then delivers the task again while it still runs "
                    "(celery#5935). Set CELERY_BROKER_TRANSPORT_OPTIONS = "
                    f'{{"visibility_timeout": {int(needed * 2)}}} or more.',
                    id="initpipeline.W001",
                )
            )

    if scheme == "memory" and not celery_conf.task_always_eager:
        warnings.append(
            checks.Warning(
                "The Celery broker is memory://, which only reaches workers inside this "
                "same process: a `celery worker` process never receives the phases.",
                hint="Use filesystem:// (one host), Redis or RabbitMQ. Silence this check "
                "if your workers run in-process (celery.contrib.testing.worker).",
                id="initpipeline.W002",
            )
        )

    if longest is not None and longest > LONG_PHASE and not _phase_acks_late(celery_conf):
        warnings.append(
            checks.Warning(
                f"Phase tasks are acknowledged early, and a phase may run {longest} s: a "
                "worker lost mid-phase loses the message on every broker.",
                hint="Remove the acks_late=False annotation of initpipeline.run_phase "
                "(CELERY_TASK_ANNOTATIONS). Recovery then waits STALE_AFTER less.",
                id="initpipeline.W003",
            )
        )

    stale_after = conf.get("STALE_AFTER")
    heartbeat = conf.get("HEARTBEAT_INTERVAL")
    if (
        isinstance(stale_after, int | float)
        and isinstance(heartbeat, int | float)
        and 0 < stale_after < 3 * heartbeat
    ):
        warnings.append(
            checks.Warning(
                f"INITPIPELINE['STALE_AFTER'] ({stale_after:g} s) is less than three "
                f"heartbeats ({heartbeat:g} s each): a slow database write can make a live "
                "phase look lost, and it is then sent again.",
                hint="Keep STALE_AFTER at ten heartbeats or more.",
                id="initpipeline.W005",
            )
        )
    return warnings


@checks.register(checks.Tags.database)
def check_sqlite_wal(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """A SQLite database that workers, web and CLI share must be in WAL mode.

    A database check: it runs with `manage.py check --database default` and before
    `migrate`, not on every command.
    """
    from django.db import connections

    warnings: list[Any] = []
    for alias in databases or []:
        conn = connections[alias]
        if conn.vendor != "sqlite":
            continue
        with conn.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode")
            row = cursor.fetchone()
        mode = str(row[0]).lower() if row else "?"
        if mode != "wal":
            warnings.append(
                checks.Warning(
                    f"The SQLite database {alias!r} is in {mode!r} journal mode, not WAL: "
                    "a worker, the web server and the CLI writing it at once get "
                    '"database is locked".',
                    hint='Set DATABASES[...]["OPTIONS"] = {"init_command": '
                    '"PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL", '
                    '"transaction_mode": "IMMEDIATE", "timeout": 20}.',
                    id="initpipeline.W004",
                )
            )
    return warnings
