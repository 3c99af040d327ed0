"""The 503 "warming up" response: HTML for browsers, JSON for API clients; and keeping
these expected 503s out of the error log."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string

from .conf import settings
from .health import public_progress

#: Set on a request whose 503 answer says "not ready yet" on purpose.
EXPECTED = "initpipeline_not_ready"


def expected_unavailable(request: HttpRequest) -> None:
    """Mark ``request``'s 503 answer as expected: logged at INFO, not as a server error."""
    setattr(request, EXPECTED, True)


class NotReadyIsNotAnError(logging.Filter):
    """On ``django.request``: our expected 503s become INFO records.

    Django logs every 5xx answer at ERROR on ``django.request``; with DEBUG=False and
    ADMINS set, its default logging mails each one to the admins, so a readiness probe
    every 5 s through an hour-long init would send 720 mails per pod, and error trackers
    would count them. AppConfig.ready() adds this filter to the logger; a record of an
    expected answer is kept, at INFO, and no handler at ERROR sees it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(getattr(record, "request", None), EXPECTED, False):
            record.levelno = logging.INFO
            record.levelname = logging.getLevelName(logging.INFO)
        return True


def warming_up(request: HttpRequest, missing: Sequence[str]) -> HttpResponse:
    """503 + Retry-After + Cache-Control: no-store, with the public progress of the init."""
    expected_unavailable(request)
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
