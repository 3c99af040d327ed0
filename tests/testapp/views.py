import os

from django.http import HttpRequest, HttpResponse, JsonResponse

from initpipeline import artifact, requires_artifacts

B_OUT = artifact("b_out")


@requires_artifacts("b_out")
def b_total(request: HttpRequest) -> HttpResponse:
    values = B_OUT.get()
    return JsonResponse(
        {
            "pid": os.getpid(),
            "generation": B_OUT.generation,
            "total": float(values.sum()),
        }
    )


JOIN_OUT = artifact("join_out")


@requires_artifacts("join_out")
def join_sides(request: HttpRequest) -> HttpResponse:
    """tests/parallelapp's join artifact, as the web host serves it."""
    return JsonResponse({"generation": JOIN_OUT.generation, "sides": JOIN_OUT.get()["sides"]})
