"""Probes and the staff status endpoint."""

from __future__ import annotations

import hmac
import re

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.http import http_date
from django.views.decorators.cache import never_cache

from .conf import settings
from .exceptions import PipelineConfigError
from .health import readiness_json
from .permissions import can_see_details
from .registry import get_pipeline
from .reporting import status_report
from .responses import expected_unavailable

HEALTH_JSON = "application/health+json"
# ASCII digits only: str.isdigit() also takes "²", which int() refuses.
RUN_ID = re.compile(r"[1-9][0-9]{0,17}")


#: never_cache's Cache-Control, written out: the probes answer thousands of times a
#: minute under a crowd, and never_cache parses and rebuilds the header for each answer
#: (a third of a not-ready readyz answer's own time).
NEVER_CACHE = "max-age=0, no-cache, no-store, must-revalidate, private"


def _uncached(response: HttpResponse) -> HttpResponse:
    """What django.views.decorators.cache.never_cache adds, for the probes' hot path."""
    response["Expires"] = http_date()
    response["Cache-Control"] = NEVER_CACHE
    return response


def livez(request: HttpRequest) -> HttpResponse:
    """200 while the process can answer; touches neither the database nor the artifacts."""
    return _uncached(HttpResponse("ok\n", content_type="text/plain"))


def readyz(request: HttpRequest) -> HttpResponse:
    """200 once the required artifacts (or ``?artifact=NAME``) are active, else 503."""
    name = request.GET.get("artifact") or None
    if name is not None and name not in get_pipeline().producer:
        return _uncached(
            JsonResponse(
                {"status": "fail", "description": f"no phase produces {name!r}"},
                status=404,
                content_type=HEALTH_JSON,
            )
        )
    body, ready = readiness_json(name)
    response = HttpResponse(body, status=200 if ready else 503, content_type=HEALTH_JSON)
    if not ready:
        expected_unavailable(request)
        response["Retry-After"] = str(settings.RETRY_AFTER)
    return _uncached(response)


#: The challenge of a 401 from /init/metrics (RFC 6750).
BEARER_CHALLENGE = 'Bearer realm="initpipeline metrics"'


def metrics_access(request: HttpRequest) -> int:
    """200 when ``request`` may read the metrics, else the status to answer: 401 for a
    missing or wrong bearer token (Prometheus scrapes with ``METRICS_TOKEN``, which is
    compared in constant time), 403 for a signed-in user who may not see the init's
    details (``can_see_details``, the admin's progress pages' rule)."""
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer":
        token = settings.METRICS_TOKEN
        ok = token is not None and hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), token.encode()
        )
        return 200 if ok else 401
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return 401
    return 200 if can_see_details(user) else 403


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics (README: Monitoring): for Prometheus with METRICS_TOKEN, and for
    staff who may see the init's details."""
    status = metrics_access(request)
    if status != 200:
        response = HttpResponse(
            "forbidden\n" if status == 403 else "a valid bearer token is needed\n",
            status=status,
            content_type="text/plain",
        )
        if status == 401:
            response["WWW-Authenticate"] = BEARER_CHALLENGE
        return response
    try:
        # Only here: a web process that serves no metrics never imports prometheus-client.
        from . import metrics as prometheus
    except ImportError:
        return HttpResponse(
            'prometheus-client is not installed: pip install "initpipeline[metrics]"\n',
            status=501,
            content_type="text/plain",
        )
    body, content_type = prometheus.exposition(request.headers.get("Accept"))
    return HttpResponse(body, content_type=content_type)


@never_cache
def status_json(request: HttpRequest) -> HttpResponse:
    """``init_status --json``, for the admin's pages and scripts: staff who may view runs."""
    if not can_see_details(request.user):
        return JsonResponse({"detail": "forbidden"}, status=403)
    run_id = request.GET.get("run")
    if run_id is not None and not RUN_ID.fullmatch(run_id):
        return JsonResponse({"detail": f"run must be a run id, not {run_id[:40]!r}"}, status=400)
    try:
        report = status_report(run_id=int(run_id) if run_id else None)
    except PipelineConfigError as exc:
        return JsonResponse({"detail": str(exc)}, status=404)
    return JsonResponse(report.as_dict())
