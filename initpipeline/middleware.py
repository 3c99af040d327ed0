"""WarmingUpMiddleware: "warming up" for whole URL prefixes (INITPIPELINE["WARMUP_PATHS"])."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from .checks import refuse_to_serve
from .conf import settings
from .health import missing_artifacts
from .responses import warming_up


class WarmingUpMiddleware:
    """Answers 503 for a path under a prefix of WARMUP_PATHS until its artifacts are active."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        # Gunicorn runs no system checks: a WARMUP_PATHS of the wrong shape would answer
        # 500 on every request, or 503 for ever. Refuse to start instead, with the reason.
        refuse_to_serve()

    def __call__(self, request: HttpRequest) -> HttpResponse:
        prefixes: dict[str, list[str]] = settings.WARMUP_PATHS
        for prefix, names in prefixes.items():
            if request.path.startswith(prefix):
                missing = missing_artifacts(list(names))
                if missing:
                    return warming_up(request, missing)
        return self.get_response(request)
