"""Handles with a loader the tests steer through the control file (tests/testapp/work.py).

``control()["loader"]`` may hold, for the "model" artifact's loader:
  sleep:  seconds    the load takes this long (the GIL free: time.sleep)
  gil:    seconds    the load holds the GIL this long (a C call that never releases it)
  fail:   [version]  loading these versions raises
  hold:   [version]  loading these versions waits until they are no longer listed
                     ("<version>@<pid>": in that process only)

Every load appends "<pid> <event> <version> <unix time> <models alive>" to
``$INITPIPELINE_VAR_DIR/loads.log``: events start, loaded, failed, warm. "models alive"
counts the Model objects of this process still in memory when the event happened.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
import weakref
from pathlib import Path
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from initpipeline import artifact, requires_artifacts
from tests.testapp.work import control, var_dir

_alive: weakref.WeakSet[Model] = weakref.WeakSet()


class Model:
    def __init__(self, version: str, payload: Any) -> None:
        self.version = version
        self.payload = payload
        self.warm = False
        _alive.add(self)


def _log(event: str, version: str) -> None:
    with open(var_dir() / "loads.log", "a") as log:
        log.write(f"{os.getpid()} {event} {version} {time.time():.6f} {len(_alive)}\n")


def load_model(path: Path) -> Model:
    data = json.loads(path.read_text())
    version = str(data["version"])
    _log("start", version)
    steer = control().get("loader", {})
    if steer.get("sleep"):
        time.sleep(float(steer["sleep"]))
    if steer.get("gil"):
        # libc's sleep() called through PyDLL keeps the GIL: a loader that never lets
        # another thread of the process run.
        ctypes.PyDLL(None).sleep(int(steer["gil"]))
    deadline = time.monotonic() + 120
    mine = {version, f"{version}@{os.getpid()}"}
    while mine & set(control().get("loader", {}).get("hold", [])) and time.monotonic() < deadline:
        time.sleep(0.02)
    if version in control().get("loader", {}).get("fail", []):
        _log("failed", version)
        raise RuntimeError(f"cannot load model version {version}")
    model = Model(version, data)
    _log("loaded", version)
    return model


def warm_model(model: Model) -> None:
    model.warm = True
    _log("warm", model.version)


MODEL = artifact(
    "model",
    loader=load_model,
    warmup=warm_model,
    swap=os.environ.get("TESTAPP_SWAP", "load-first"),
)


def load_folder(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_text() for p in path.rglob("*") if p.is_file()}


FOLDER = artifact("folder", loader=load_folder)


@requires_artifacts("model")
def model(request: HttpRequest) -> HttpResponse:
    served = MODEL.get()
    return JsonResponse(
        {
            "pid": os.getpid(),
            "generation": MODEL.generation,
            "version": served.version,
            "warm": served.warm,
        }
    )


@requires_artifacts("folder")
def folder(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"generation": FOLDER.generation, "files": FOLDER.get()})
