from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class InitPipelineConfig(AppConfig):
    name = "initpipeline"
    verbose_name = _("Init pipeline")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks, the settings signal and the worker's recovery
        # watchdog (started by Celery's worker_ready signal); reads nothing.
        from . import checks, conf, signals  # noqa: F401
