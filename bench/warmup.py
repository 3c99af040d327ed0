"""A crowd during the warm-up: what it costs the init, and how fast the 503s come.

- Deploy to ready while `wrk` hammers the warming-up page (``/``, the demo's search page,
  which needs the artifacts) against the same deploy without it, one after the other.
- Answers per second during a warm-up (a run enqueued, no worker yet: the site shows its
  progress) of ``/init/readyz`` and of the warming-up page, against a trivial view.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.harness import Env, gunicorn_cmd, log, manage, reset, running, wait_http
from bench.overhead import deploy_to_ready
from tests.servers import free_port

PAGE = "/"


def flood(env: Env, reps: int) -> dict[str, Any]:
    quiet: list[float] = []
    loud: list[float] = []
    requests: list[float] = []
    web_cpu: list[float] = []
    for rep in range(reps):
        quiet.append(deploy_to_ready(env).total)
        flooded = deploy_to_ready(env, load=PAGE)
        loud.append(flooded.total)
        requests.append((flooded.requests or 0) / flooded.total)
        web_cpu.append((flooded.web_cpu_s or 0.0) / flooded.total)
        log(
            f"deploy to ready, rep {rep + 1}: {quiet[-1]:.2f} s; with wrk on {PAGE}: "
            f"{loud[-1]:.2f} s, {requests[-1]:.0f} answers/s, web server "
            f"{web_cpu[-1]:.2f} CPU-s/s"
        )
    q, w = statistics.median(quiet), statistics.median(loud)
    return {
        "page": PAGE,
        "client": "wrk -t1 -c8",
        "quiet_s": round(q, 3),
        "flooded_s": round(w, 3),
        "ratio": round(w / q, 3),
        # What the crowd took: answers per second, and cores the web server kept busy.
        "answers_per_s": round(statistics.median(requests), 1),
        "web_cpu_cores": round(statistics.median(web_cpu), 2),
        "runs_s": {"quiet": [round(x, 3) for x in quiet], "flooded": [round(x, 3) for x in loud]},
    }


def answers_per_second(env: Env, reps: int, seconds: float) -> dict[str, Any]:
    from bench.figures import load

    reset(env)
    port = free_port()
    cmd = gunicorn_cmd("project.wsgi:application", port, 2, "-c", "project/gunicorn.conf.py")
    paths = ["/bench/trivial", "/init/readyz", PAGE]
    rates: dict[str, list[float]] = {p: [] for p in paths}
    with running(cmd, env.vars(), "warmup-web") as web:
        wait_http(f"http://127.0.0.1:{port}/init/livez", web, 60, lambda c: c == 200)
        # Enqueued, with no worker to run it: the site warms up, with a run to show.
        result = manage(env, "start_init")
        if result.returncode:
            raise SystemExit(f"start_init failed:\n{result.stderr}")
        for path in paths:
            wait_http(f"http://127.0.0.1:{port}{path}", web, 10, lambda c: c in (200, 503))
            load(f"http://127.0.0.1:{port}{path}", 1)  # warm-up
        # The best of at least 5 runs, for every path alike: wrk's 16 connections are
        # accepted by Gunicorn's 2 workers as it happens, and a run whose connections all
        # land on one worker gets half the rate (about one in three here, on any path,
        # trivial view included), which a median of 3 does not always outvote.
        for _ in range(max(reps, 5)):
            for path in paths:  # side by side: each repetition measures all three
                rates[path].append(load(f"http://127.0.0.1:{port}{path}", seconds))
        log(
            "answers/s during the warm-up (best run): "
            + ", ".join(f"{p} {max(r):.0f}" for p, r in rates.items())
        )
    out: dict[str, Any] = {p: round(max(r), 1) for p, r in rates.items()}
    out["ratios"] = {p: round(out[p] / out["/bench/trivial"], 2) for p in paths[1:]}
    out["runs"] = {p: [round(x, 1) for x in r] for p, r in rates.items()}
    return out
