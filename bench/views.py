"""Views the benchmarks hit: a trivial one, and the LSA matrix loaded two ways."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from initpipeline import artifact

LSA = artifact("lsa_docs")
_pickled: Any = None


def trivial(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain")


def pid(request: HttpRequest) -> HttpResponse:
    """Warm-up: everything lsa_mmap does but map the matrix (numpy, the database connection,
    the generation lookup), so the memory measured after it is the matrix alone."""
    import numpy  # noqa: F401

    LSA.record()
    return JsonResponse({"pid": os.getpid()})


def lsa_mmap(request: HttpRequest) -> HttpResponse:
    """Use every page of the memory-mapped artifact, as a search over it would."""
    matrix = LSA.get()
    return JsonResponse({"pid": os.getpid(), "sum": float(matrix.sum(dtype="float64"))})


def lsa_pickle(request: HttpRequest) -> HttpResponse:
    """What a user without initpipeline does: unpickle the matrix once per worker."""
    global _pickled
    if _pickled is None:
        with open(Path(os.environ["BENCH_PICKLE"]), "rb") as fh:
            _pickled = pickle.load(fh)  # noqa: S301 - written by the benchmark itself
    return JsonResponse({"pid": os.getpid(), "sum": float(_pickled.sum(dtype="float64"))})
