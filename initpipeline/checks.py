"""System checks, each fault with its own id: settings and pipeline errors (E001...),
deployment warnings (W001...). README "Settings" lists them all."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from django.apps import AppConfig
from django.conf import settings as django_settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from .celery_settings import FILESYSTEM_TRANSPORT, REDIS_SCHEMES
from .conf import DEFAULTS
from .conf import settings as conf
from .dispatch import HARD_LIMIT_GRACE, PHASE_TASK_OPTIONS, celery_app
from .exceptions import PipelineConfigError
from .registry import MAX_TIMEOUT, Fault, Pipeline, get_pipeline

# -- settings (initpipeline.E001, E007, E008, E013...) ------------------------------------

_POSITIVE = (
    "REFRESH_INTERVAL",
    "HEARTBEAT_INTERVAL",
    "PROGRESS_INTERVAL",
    "STALE_AFTER",
    "DEFAULT_TIMEOUT",
    "RETRY_BACKOFF",
    "RETRY_BACKOFF_MAX",
    "RETRY_AFTER",
    "SEND_TIMEOUT",
    "HANDOFF_GRACE",
    "SKEW_TIMEOUT",
)
_BOOLEANS = ("GC_AFTER_ACTIVATION", "START_ON_GUNICORN_READY", "METRICS_SHARDS")

#: The shortest bearer token /init/metrics accepts (a guessable token is no protection).
METRICS_TOKEN_MIN = 16


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def _strings(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


@checks.register()
def check_settings(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    user = getattr(django_settings, "INITPIPELINE", {})
    if not isinstance(user, dict):
        return [
            checks.Error(
                f"settings.INITPIPELINE must be a dict, not {type(user).__name__}.",
                id="initpipeline.E001",
            )
        ]
    errors: list[Any] = []
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        errors.append(
            checks.Error(
                f"settings.INITPIPELINE has unknown keys: {', '.join(map(str, unknown))}.",
                hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.",
                id="initpipeline.E013",
            )
        )
    for key in _POSITIVE:
        value = conf.raw(key)
        if not _positive(value):
            errors.append(
                checks.Error(
                    f"INITPIPELINE[{key!r}] must be a positive number, not {value!r}.",
                    id="initpipeline.E014",
                )
            )
    timeout = conf.raw("DEFAULT_TIMEOUT")
    if _positive(timeout) and timeout > MAX_TIMEOUT:
        errors.append(
            checks.Error(
                f"INITPIPELINE['DEFAULT_TIMEOUT'] is {timeout!r} s, more than a week.",
                hint=f"Give a phase at most {MAX_TIMEOUT} s; split a longer one.",
                id="initpipeline.E019",
            )
        )
    keep = conf.raw("KEEP_GENERATIONS")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        errors.append(
            checks.Error(
                f"INITPIPELINE['KEEP_GENERATIONS'] must be an integer >= 1, not {keep!r}.",
                id="initpipeline.E015",
            )
        )
    lost = conf.raw("LOST_LIMIT")
    if isinstance(lost, bool) or not isinstance(lost, int) or lost < 0:
        errors.append(
            checks.Error(
                f"INITPIPELINE['LOST_LIMIT'] must be an integer >= 0, not {lost!r}.",
                id="initpipeline.E024",
            )
        )
    for key in _BOOLEANS:
        if not isinstance(conf.raw(key), bool):
            errors.append(
                checks.Error(
                    f"INITPIPELINE[{key!r}] must be True or False, not {conf.raw(key)!r}.",
                    id="initpipeline.E021",
                )
            )
    queue = conf.raw("QUEUE")
    if queue is not None and (not isinstance(queue, str) or not queue):
        errors.append(
            checks.Error(
                f"INITPIPELINE['QUEUE'] must be the name of a Celery queue or None, not {queue!r}.",
                id="initpipeline.E018",
            )
        )
    if not _strings(conf.raw("REQUIRED_ARTIFACTS")):
        errors.append(
            checks.Error(
                "INITPIPELINE['REQUIRED_ARTIFACTS'] must be a list of artifact names, not "
                f"{conf.raw('REQUIRED_ARTIFACTS')!r}.",
                id="initpipeline.E020",
            )
        )
    paths = conf.raw("WARMUP_PATHS")
    if not isinstance(paths, dict) or not all(
        isinstance(prefix, str) and prefix.startswith("/") and _strings(names)
        for prefix, names in paths.items()
    ):
        errors.append(
            checks.Error(
                f"INITPIPELINE['WARMUP_PATHS'] must map URL prefixes to lists of artifact "
                f"names, not {paths!r}.",
                hint='For example {"/search/": ["lsa"]}.',
                id="initpipeline.E016",
            )
        )
    cache_dir = conf.raw("LOCAL_CACHE_DIR")
    if cache_dir is not None and not isinstance(cache_dir, str | PurePath):
        errors.append(
            checks.Error(
                f"INITPIPELINE['LOCAL_CACHE_DIR'] must be a path or None, not {cache_dir!r}.",
                id="initpipeline.E022",
            )
        )
    celery_app = conf.raw("CELERY_APP")
    if celery_app is not None and not (
        isinstance(celery_app, str) and all(part.isidentifier() for part in celery_app.split("."))
    ):
        errors.append(
            checks.Error(
                "INITPIPELINE['CELERY_APP'] must be the dotted path of a Celery app or None, "
                f"not {celery_app!r}.",
                hint='For example "myproject.celery.app".',
                id="initpipeline.E025",
            )
        )
    token = conf.raw("METRICS_TOKEN")
    if token is not None and not (isinstance(token, str) and len(token) >= METRICS_TOKEN_MIN):
        # Never the token itself: the check's output ends up in logs.
        shown = (
            f"a string of {len(token)} characters"
            if isinstance(token, str)
            else f"a {type(token).__name__}"
        )
        errors.append(
            checks.Error(
                f"INITPIPELINE['METRICS_TOKEN'] must be None or a string of at least "
                f"{METRICS_TOKEN_MIN} characters, not {shown}.",
                hint='For example os.environ.get("INITPIPELINE_METRICS_TOKEN"), made with '
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'.",
                id="initpipeline.E027",
            )
        )
    alias = conf.raw("STORAGE")
    if alias not in getattr(django_settings, "STORAGES", {}):
        errors.append(
            checks.Error(
                f"settings.STORAGES has no {alias!r} entry for the artifacts.",
                hint='Add STORAGES["initpipeline"] = {"BACKEND": '
                '"django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": ...}}.',
                id="initpipeline.E007",
            )
        )
    return errors


# -- the pipeline (initpipeline.E002...E012) ----------------------------------------------

#: The check id of each kind of pipeline defect (registry.Fault).
PIPELINE_IDS: dict[Fault, str] = {
    Fault.CYCLE: "initpipeline.E002",
    Fault.UNKNOWN_DEPENDENCY: "initpipeline.E003",
    Fault.PRODUCED_TWICE: "initpipeline.E004",
    Fault.UNKNOWN_INPUT: "initpipeline.E005",
    Fault.BAD_CONFIG: "initpipeline.E006",
    Fault.DUPLICATE_NAME: "initpipeline.E010",
    Fault.PRODUCES_NOTHING: "initpipeline.E011",
    Fault.BAD_LIMITS: "initpipeline.E012",
    Fault.BAD_ARTIFACT_NAME: "initpipeline.E023",
    Fault.BAD_SHARDS: "initpipeline.E028",
    Fault.BAD_PHASE_NAME: "initpipeline.E029",
    Fault.PART_NAME_TOO_LONG: "initpipeline.E030",
    Fault.VERSION_TOO_LONG: "initpipeline.E031",
}
IMPORT_FAILED = "initpipeline.E009"


def pipeline_errors(pipeline: Pipeline) -> list[checks.Error]:
    """The pipeline's defects as system-check errors."""
    return [
        checks.Error(p.msg, hint=p.hint, obj=p.obj, id=PIPELINE_IDS[p.fault])
        for p in pipeline.problems()
    ]


def validate_pipeline(pipeline: Pipeline) -> None:
    """Raise PipelineConfigError naming the pipeline's first defect and its check id."""
    errors = pipeline_errors(pipeline)
    if errors:
        raise PipelineConfigError(f"{errors[0].msg} ({errors[0].id})")


@checks.register()
def check_pipeline(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    try:
        pipeline = get_pipeline()
    except PipelineConfigError as exc:
        return [checks.Error(str(exc), id=IMPORT_FAILED)]
    errors: list[Any] = pipeline_errors(pipeline)
    required = conf.raw("REQUIRED_ARTIFACTS")
    for name in required if _strings(required) else []:
        if name not in pipeline.producer:
            errors.append(
                checks.Error(
                    f"INITPIPELINE['REQUIRED_ARTIFACTS'] names {name!r}, which no phase produces.",
                    id="initpipeline.E008",
                )
            )
    paths = conf.raw("WARMUP_PATHS")
    for prefix, names in paths.items() if isinstance(paths, dict) else ():
        for name in names if _strings(names) else []:
            if name not in pipeline.producer:
                errors.append(
                    checks.Error(
                        f"INITPIPELINE['WARMUP_PATHS'][{prefix!r}] names {name!r}, which no "
                        "phase produces.",
                        hint="Its pages would answer 503 for ever.",
                        id="initpipeline.E017",
                    )
                )
    return errors


def refuse_to_serve() -> None:
    """Raise ImproperlyConfigured naming the first settings or pipeline error, if any.

    Gunicorn runs no system checks: a web process with a bad setting would answer 500 on
    every request (REFRESH_INTERVAL "fast", an unknown STORAGE) or 503 for ever (a
    REQUIRED_ARTIFACTS nobody produces). It refuses to start instead, with one line.
    """
    errors = [e for e in check_settings() + check_pipeline() if e.is_serious()]
    if errors:
        more = f" (and {len(errors) - 1} more: manage.py check)" if len(errors) > 1 else ""
        raise ImproperlyConfigured(f"{errors[0].msg} ({errors[0].id}){more}")


# -- warnings about the deployment (initpipeline.W001...) ---------------------------------

#: Phases allowed to run this long (seconds) before early acks are worth a warning.
LONG_PHASE = 300


def _longest_limit() -> int | None:
    """The longest a phase task may run: the largest timeout plus the hard limit's grace."""
    try:
        phases = get_pipeline().phases.values()
    except PipelineConfigError:
        return None  # initpipeline.E009 reports it.
    if not phases:
        return None
    default = conf.raw("DEFAULT_TIMEOUT")
    if not _positive(default):
        return None  # initpipeline.E014 reports it.
    return max(int(p.timeout or default) for p in phases) + HARD_LIMIT_GRACE


def _phase_acks_late(celery_conf: Any) -> bool:
    """Whether phase tasks are acknowledged late, as the worker will apply it.

    run_phase sets acks_late itself, which wins over task_acks_late; only task_annotations
    can change it for the task.
    """
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
    """Celery settings that lose or duplicate phases (read from the project's Celery app)."""
    try:
        app = celery_app()
    except PipelineConfigError as exc:
        return [checks.Error(str(exc), id="initpipeline.E026")]
    celery_conf = app.conf
    warnings: list[Any] = []
    url = str(celery_conf.broker_url or "")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    longest = _longest_limit()

    if scheme in REDIS_SCHEMES and longest is not None:
        options = celery_conf.broker_transport_options or {}
        visibility = float(options.get("visibility_timeout", 3600))
        retry_wait = conf.raw("RETRY_BACKOFF_MAX")
        retry_wait = float(retry_wait) if _positive(retry_wait) else 0.0
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

    transport = celery_conf.broker_transport
    if transport == FILESYSTEM_TRANSPORT and scheme not in ("", "filesystem"):
        # The scheme alone: a broker URL may hold a password.
        warnings.append(
            checks.Error(
                f"CELERY_BROKER_TRANSPORT names initpipeline's filesystem transport, "
                f"but CELERY_BROKER_URL is a {scheme}:// URL: Celery would send and "
                "take the phases through the filesystem, not that broker.",
                hint="Pass the URL to celery_settings() instead of setting "
                "CELERY_BROKER_URL after it, or delete CELERY_BROKER_TRANSPORT.",
                id="initpipeline.E032",
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

    stale_after = conf.raw("STALE_AFTER")
    heartbeat = conf.raw("HEARTBEAT_INTERVAL")
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


@checks.register()
def check_code_sources(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """Phases whose code counts in their fingerprint through bytecode (codehash.py)."""
    try:
        phases = get_pipeline().phases.values()
    except PipelineConfigError:
        return []  # initpipeline.E009 reports it.
    return [
        checks.Warning(
            f"phase {p.name!r}: no source found for {', '.join(p.code_hash.without_source)}; "
            "its code counts in the fingerprint through its bytecode, which differs between "
            "Python versions.",
            hint="Deploy the .py files, or hosts on different Pythons rebuild the phase "
            "for each other.",
            obj=p.name,
            id="initpipeline.W006",
        )
        for p in phases
        if p.code_hash.without_source
    ]


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
