"""Time to first response against the literal `django-admin startproject` and the minimal project.

Each project is started by the same Gunicorn command (2 gthread workers) and asked for
``/admin/login/``, a page every one of them has (startproject's own urls hold the admin
and nothing else) and that touches no database: Gunicorn's start to the first 200.

- startproject: ``django-admin startproject`` exactly as it comes (DEBUG on, its urls),
  made once under var/.
- minimal: bench/peers/bare_wsgi.py, startproject's apps and middleware in one module.
- initpipeline: the demo project, with project/gunicorn.conf.py.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench.harness import (
    PY,
    ROOT,
    VAR,
    Env,
    compile_bytecode,
    gunicorn_cmd,
    log,
    reset,
    running,
    wait_http,
)
from tests.servers import free_port

STARTPROJECT = VAR.parent / "bench-startproject"
URL = "/admin/login/"


def literal_startproject() -> Path:
    if not (STARTPROJECT / "manage.py").exists():
        STARTPROJECT.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [PY, "-m", "django", "startproject", "lit", str(STARTPROJECT)],
            check=True,
            cwd=ROOT,
        )
    compile_bytecode(STARTPROJECT)
    return STARTPROJECT


def first_response(env: Env, reps: int, workers: int = 2) -> dict[str, Any]:
    reset(env)
    folder = literal_startproject()
    lit = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "lit.settings",
        "PYTHONPATH": str(folder),
        "PYTHONUNBUFFERED": "1",
    }
    projects: dict[str, tuple[str, list[str], dict[str, str]]] = {
        "startproject": ("lit.wsgi:application", [], lit),
        "minimal": ("bench.peers.bare_wsgi:application", [], env.vars()),
        "initpipeline": (
            "project.wsgi:application",
            ["-c", "project/gunicorn.conf.py"],
            env.vars(),
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in projects}
    for rep in range(reps):
        for name, (app, extra, variables) in projects.items():  # side by side, in turn
            port = free_port()
            cmd = gunicorn_cmd(app, port, workers, *extra)
            with running(cmd, variables, f"startup-{name}") as proc:
                times[name].append(
                    wait_http(f"http://127.0.0.1:{port}{URL}", proc, 120, lambda c: c == 200)
                )
        log(
            f"first response {URL}, rep {rep + 1}: "
            + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items())
        )
    out: dict[str, Any] = {n: round(statistics.median(t), 3) for n, t in times.items()}
    out["ratios"] = {
        "to_startproject": round(out["initpipeline"] / out["startproject"], 2),
        "to_minimal": round(out["initpipeline"] / out["minimal"], 2),
    }
    out["workers"] = workers
    out["url"] = URL
    out["runs_s"] = {n: [round(x, 3) for x in t] for n, t in times.items()}
    return out
