"""The 503 "warming up" response: HTML for browsers, JSON for API clients; and keeping
these expected 503s out of the error log."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest, HttpResponse
from django.template.loader import get_template, render_to_string
from django.utils.translation import get_language

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


TEMPLATE = "initpipeline/warming_up.html"
_OWN_TEMPLATE = Path(__file__).resolve().parent / "templates" / TEMPLATE

#: (type, missing, language, Retry-After) -> (the progress it shows, the body): a body is
#: rendered once per look at the progress (health.public_progress), not per request.
_bodies: dict[tuple[Any, ...], tuple[dict[str, Any], bytes]] = {}


@functools.cache
def _page_is_ours() -> bool:
    """True unless the project overrides the template: only ours is known to show the same
    to every visitor (an override may greet the user), so only ours is rendered once."""
    template = getattr(get_template(TEMPLATE), "template", None)
    name = getattr(getattr(template, "origin", None), "name", None)
    return name is not None and Path(name).resolve() == _OWN_TEMPLATE


@functools.lru_cache(maxsize=64)
def _wants_json(accept: str) -> bool:
    """Whether an Accept header prefers JSON to HTML: Django's negotiation, remembered
    per header (parsing it took half the time of a cached warming-up answer)."""
    probe = HttpRequest()
    probe.META["HTTP_ACCEPT"] = accept
    return probe.get_preferred_type(["text/html", "application/json"]) == "application/json"


def warming_up(request: HttpRequest, missing: Sequence[str]) -> HttpResponse:
    """503 + Retry-After + Cache-Control: no-store, with the public progress of the init.

    A crowd during the warm-up gets the same answer: it is built once per look at the
    progress (at most every loading.NOT_READY_INTERVAL), not once per request.
    """
    expected_unavailable(request)
    retry_after = settings.RETRY_AFTER
    progress = public_progress()
    json_wanted = _wants_json(request.META.get("HTTP_ACCEPT", ""))
    key = (json_wanted, tuple(missing), get_language(), retry_after)
    cached = _bodies.get(key)
    if cached is not None and cached[0] is progress:
        body = cached[1]
    elif json_wanted:
        data = {"status": "warming_up", "missing": list(missing), **progress}
        body = json.dumps(data, cls=DjangoJSONEncoder).encode()
        _bodies[key] = (progress, body)
    else:
        context = {"missing": missing, "retry_after": retry_after, **progress}
        body = render_to_string(TEMPLATE, context, request=request).encode()
        if _page_is_ours():
            _bodies[key] = (progress, body)
    content_type = "application/json" if json_wanted else "text/html; charset=utf-8"
    response = HttpResponse(body, status=503, content_type=content_type)
    response["Retry-After"] = str(retry_after)
    response["Cache-Control"] = "no-store"
    response["Vary"] = "Accept"
    return response
