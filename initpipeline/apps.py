from __future__ import annotations

import logging

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class InitPipelineConfig(AppConfig):
    name = "initpipeline"
    verbose_name = _("Init pipeline")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the system checks and the settings signal; reads nothing. The worker's
        # signals (signals.py) are connected by tasks.py, which only workers import: a web
        # process imports no Celery until it sends a task (dispatch.celery_app).
        from . import checks, conf  # noqa: F401
        from .responses import NotReadyIsNotAnError

        # Expected "not ready yet" 503s are not server errors (responses.py).
        request_logger = logging.getLogger("django.request")
        if not any(isinstance(f, NotReadyIsNotAnError) for f in request_logger.filters):
            request_logger.addFilter(NotReadyIsNotAnError())
