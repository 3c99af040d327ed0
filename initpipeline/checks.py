"""System checks for the settings and the pipeline (ids initpipeline.E001...)."""

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
