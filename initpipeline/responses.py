"""The 503 "warming up" response: HTML for browsers, JSON for API clients."""

from __future__ import annotations

from collections.abc import Sequence

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string

from .conf import settings
from .health import public_progress


def warming_up(request: HttpRequest, missing: Sequence[str]) -> HttpResponse:
    """503 + Retry-After + Cache-Control: no-store, with the public progress of the init."""
    retry_after = settings.RETRY_AFTER
    progress = public_progress()
    preferred = request.get_preferred_type(["text/html", "application/json"])
    if preferred == "application/json":
        response: HttpResponse = JsonResponse(
            {"status": "warming_up", "missing": list(missing), **progress}, status=503
        )
    else:
        html = render_to_string(
            "initpipeline/warming_up.html",
            {"missing": missing, "retry_after": retry_after, **progress},
            request=request,
        )
        response = HttpResponse(html, status=503)
    response["Retry-After"] = str(retry_after)
    response["Cache-Control"] = "no-store"
    response["Vary"] = "Accept"
    return response
