"""Measurements against the peers, each a function that runs its processes and returns data.

Deploy to ready is in bench/overhead.py, the large artifacts in bench/big.py, the warm-up
crowd in bench/warmup.py and the start-up against startproject in bench/startup.py.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    VAR,
    Env,
    gunicorn_cmd,
    http_get,
    log,
    manage,
    reset,
    run_module,
    running,
    wait_http,
)
from tests.servers import free_port


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# -- 1. time to first response -------------------------------------------------------------

PEERS = {
    "bare Django": ("bench.peers.bare_wsgi:application", []),
    "initpipeline": ("project.wsgi:application", ["-c", "project/gunicorn.conf.py"]),
    "naive": ("bench.peers.naive_wsgi:application", []),
    "preload": ("bench.peers.naive_wsgi:application", ["--preload"]),
    "in-worker": ("project.wsgi:application", ["-c", "bench/peers/inworker_conf.py"]),
}


def time_to_first_response(env: Env, reps: int, workers_list: list[int]) -> dict[str, Any]:
    reset(env)
    out: dict[str, Any] = {}
    for workers in workers_list:
        for name, (app, extra) in PEERS.items():
            times = []
            for rep in range(reps):
                port = free_port()
                cmd = gunicorn_cmd(app, port, workers, *extra)
                # A -c file may set bind/workers: the command line wins.
                with running(cmd, env.vars(), f"ttfr-{name}") as proc:
                    times.append(
                        wait_http(f"http://127.0.0.1:{port}/about", proc, 900, lambda c: c == 200)
                    )
                log(f"first response, {name}, {workers} workers, rep {rep + 1}: {times[-1]:.3f} s")
            out.setdefault(str(workers), {})[name] = median(times)
        base = out[str(workers)]["bare Django"]
        out[str(workers)]["ratios"] = {
            k: round(v / base, 2) for k, v in out[str(workers)].items() if k != "ratios"
        }
    return out


# -- unchanged redeploy (deploy to ready and scale: bench/overhead.py) ----------------------


def unchanged_redeploy(env: Env, reps: int) -> dict[str, Any]:
    """`start_init --wait` when every phase is cached (the last deploy left a generation)."""
    times = []
    for _ in range(max(reps, 5)):
        started = time.monotonic()
        result = manage(env, "start_init", "--wait")
        times.append(time.monotonic() - started)
        if result.returncode or "up to date" not in result.stdout:
            raise SystemExit(f"expected up to date:\n{result.stdout}{result.stderr}")
    return {"start_init_wait_s": round(median(times), 3)}


# -- 4. memory -------------------------------------------------------------------------------


def pss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def hit_every_worker(port: int, path: str, pids: set[int]) -> None:
    served: set[int] = set()
    for _ in range(1000):
        code, body = http_get(f"http://127.0.0.1:{port}{path}")
        if code != 200:
            raise SystemExit(f"{path}: {code} {body[:300]!r}")
        served.add(json.loads(body)["pid"])
        if served >= pids:
            return
    raise SystemExit(f"not every worker served {path}: {served} of {pids}")


def memory(env: Env) -> dict[str, Any]:
    """Total PSS of 4 workers after each used the LSA matrix: mmap artifact vs pickle."""
    import numpy as np

    lsa = sorted((VAR / "artifacts" / "lsa_docs").glob("*.npy"))[-1]
    array = np.load(lsa)
    one_copy_kib = array.nbytes / 1024
    pickle_path = VAR / "lsa_docs.pkl"
    with open(pickle_path, "wb") as fh:
        pickle.dump(np.array(array), fh, protocol=pickle.HIGHEST_PROTOCOL)
    out: dict[str, Any] = {"one_copy_mib": round(one_copy_kib / 1024, 1)}
    for mode in ("mmap", "pickle"):
        port = free_port()
        cmd = gunicorn_cmd("project.wsgi:application", port, 4, "-c", "project/gunicorn.conf.py")
        envv = {**env.vars(), "BENCH_PICKLE": str(pickle_path)}
        with running(cmd, envv, f"memory-{mode}") as web:
            wait_http(f"http://127.0.0.1:{port}/init/livez", web, 60, lambda c: c == 200)
            pids = set(children(web.proc.pid))
            # Warm every worker on a view that loads nothing, then measure the floor.
            hit_every_worker(port, "/bench/pid", pids)
            time.sleep(0.5)
            before = sum(pss_kib(p) for p in pids)
            hit_every_worker(port, f"/bench/lsa-{mode}", pids)
            time.sleep(0.5)
            after = sum(pss_kib(p) for p in pids)
        out[mode] = {
            "total_pss_mib": round(after / 1024, 1),
            "added_pss_mib": round((after - before) / 1024, 1),
            "copies": round((after - before) / one_copy_kib, 2),
        }
        log(f"memory {mode}: +{(after - before) / 1024:.1f} MiB over 4 workers")
    out["pickle_over_mmap"] = round(
        out["pickle"]["added_pss_mib"] / out["mmap"]["added_pss_mib"], 2
    )
    return out


# -- 5. hot path -----------------------------------------------------------------------------


def hot_path(env: Env) -> dict[str, Any]:
    return dict(run_module("bench.hotpath", env, timeout=300))


# -- 6. throughput ---------------------------------------------------------------------------


def load(url: str, seconds: float) -> float:
    """Requests per second: wrk when installed, else a small threaded Python client."""
    wrk = shutil.which("wrk")
    if wrk:
        out = subprocess.run(
            [wrk, "-t2", "-c16", f"-d{max(1, int(seconds))}s", url],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        ).stdout
        return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    count = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        nonlocal count
        while time.monotonic() < deadline:
            http_get(url)
            with lock:
                count += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return count / seconds


def throughput(env: Env, seconds: float) -> dict[str, Any]:
    port = free_port()
    cmd = gunicorn_cmd("project.wsgi:application", port, 2, "-c", "project/gunicorn.conf.py")
    out: dict[str, Any] = {"client": "wrk -t2 -c16" if shutil.which("wrk") else "python threads"}
    with running(cmd, env.vars(), "throughput") as web:
        wait_http(f"http://127.0.0.1:{port}/init/readyz", web, 60, lambda c: c == 200)
        for path in ("/bench/trivial", "/init/livez", "/init/readyz"):
            load(f"http://127.0.0.1:{port}{path}", 1)  # warm-up
            out[path] = round(load(f"http://127.0.0.1:{port}{path}", seconds), 1)
            log(f"throughput {path}: {out[path]:.0f} req/s")
    out["ratios"] = {
        p: round(out[p] / out["/bench/trivial"], 2) for p in ("/init/livez", "/init/readyz")
    }
    return out
