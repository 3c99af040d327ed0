"""Probes and the staff status endpoint."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache

from . import services


@never_cache
def livez(request: HttpRequest) -> HttpResponse:
    """200 while the process can answer; touches neither the database nor the artifacts."""
    return HttpResponse("ok\n", content_type="text/plain")


@never_cache
def readyz(request: HttpRequest) -> HttpResponse:
    from .health import readiness

    body, ready = readiness(request.GET.get("artifact"))
    response = JsonResponse(body, status=200 if ready else 503)
    response["Content-Type"] = "application/health+json"
    if not ready:
        from . import conf

        response["Retry-After"] = str(conf.get("RETRY_AFTER"))
    return response


@never_cache
def status_json(request: HttpRequest) -> HttpResponse:
    """Details for the admin and scripts: staff with the permission to view runs only."""
    user = request.user
    if not user.is_authenticated or not user.has_perm("initpipeline.view_pipelinerun"):
        return JsonResponse({"detail": "forbidden"}, status=403)
    run_id = request.GET.get("run")
    data = services.status(run_id=int(run_id) if run_id and run_id.isdigit() else None)
    return JsonResponse(data)
