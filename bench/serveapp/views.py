"""What bench/serving.py's clients ask: a key of a pickled model, as a user's view would.

``model``: a signed pickle (ctx.save_pickle's format) loaded by the built-in reader; its
swap policy from BENCH_SWAP. ``slow``: a small JSON artifact whose loader holds the GIL
for BENCH_GIL_SECONDS (a C extension that never releases it), for the WORKER TIMEOUT figure.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
from pathlib import Path
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from initpipeline import artifact, requires_artifacts

MODEL = artifact("model", swap=os.environ.get("BENCH_SWAP", "load-first"))


def _hold_the_gil(path: Path) -> Any:
    # libc's sleep() through PyDLL keeps the GIL, as some C loaders do.
    ctypes.PyDLL(None).sleep(int(os.environ.get("BENCH_GIL_SECONDS", "60")))
    return json.loads(path.read_text())


SLOW = artifact("slow", loader=_hold_the_gil)


@requires_artifacts("model")
def model(request: HttpRequest) -> HttpResponse:
    served = MODEL.get()
    key = f"k{random.randrange(served['size'])}"
    return JsonResponse(
        {
            "pid": os.getpid(),
            "version": served["version"],
            "generation": MODEL.generation,
            "value": served[key][2],
        }
    )


@requires_artifacts("slow")
def slow(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"pid": os.getpid(), "slow": SLOW.get()})
