"""Benchmarks of initpipeline against what a user would do instead, side by side in one run.

    python -m bench            # the full run (about 15 minutes on 2 cores)
    python -m bench --quick    # a tiny workload, to check the harness works

Writes bench/results/latest.json, latest.md and latest.png (or --out DIR). Every figure is
the median of --reps runs; every comparison is a ratio taken in this same run.

The peers run the same demo phase functions (bench/plain.py) the way a user without
initpipeline would: "naive" at import of wsgi.py, "preload" once in the Gunicorn master
with --preload, "in-worker" in post_worker_init with a heartbeat thread. The workload is
the demo capped to --files source files so that the peers' repeated inits fit in the run.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import (
    RedisServer,
    celery_worker,
    free_port,
    kill_group,
    spawn,
    wait_for,
    wait_worker_ready,
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
VAR = ROOT / "var" / "bench"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@dataclass
class Env:
    files: int
    broker_url: str = "filesystem://"
    extra: dict[str, str] = field(default_factory=dict)

    def vars(self) -> dict[str, str]:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "bench.settings",
            "INITPIPELINE_VAR_DIR": str(VAR),
            "CELERY_BROKER_URL": self.broker_url,
            "SEARCH_MAX_DOCS": str(self.files),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT),
            **self.extra,
        }
        return env


class Proc:
    """A background process in its own process group, logging to a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], name: str) -> None:
        VAR.mkdir(parents=True, exist_ok=True)
        self.log_path = VAR.parent / f"bench-{name}.log"
        self.proc = spawn(cmd, env, self.log_path, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        kill_group(self.proc)


@contextmanager
def running(cmd: list[str], env: dict[str, str], name: str) -> Iterator[Proc]:
    proc = Proc(cmd, env, name)
    try:
        yield proc
    finally:
        proc.stop()


def manage(env: Env, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "manage.py", *args],
        cwd=ROOT,
        env=env.vars(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reset(env: Env) -> None:
    """A new database and no artifacts: nothing is cached."""
    shutil.rmtree(VAR, ignore_errors=True)
    VAR.mkdir(parents=True)
    result = manage(env, "migrate", "--noinput")
    if result.returncode:
        raise SystemExit(f"migrate failed:\n{result.stderr}")


def gunicorn_cmd(app: str, port: int, workers: int, *extra: str) -> list[str]:
    return [
        PY,
        "-m",
        "gunicorn",
        app,
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        "gthread",
        "--threads",
        "4",
        "--timeout",
        "600",
        "--access-logfile",
        "/dev/null",
        *extra,
    ]


def wait_http(
    url: str, proc: Proc, timeout: float, ok: Callable[[int], bool], interval: float = 0.005
) -> float:
    """Seconds until url answers with a status ok() accepts, polled every interval seconds."""
    start = time.monotonic()

    def answered() -> bool:
        if proc.proc.poll() is not None:
            raise SystemExit(f"process exited early:\n{proc.log()[-3000:]}")
        try:
            return ok(http_get(url, timeout=2)[0])
        except OSError:
            return False

    try:
        wait_for(answered, timeout, interval)
    except AssertionError:
        raise SystemExit(f"{url} not ready after {timeout} s:\n{proc.log()[-3000:]}") from None
    return time.monotonic() - start


@contextmanager
def worker(env: Env, name: str = "worker") -> Iterator[Proc]:
    """One celery worker process (-c 1) for env, once it is ready."""
    with running(celery_worker(), env.vars(), name) as proc:
        try:
            wait_worker_ready(proc.proc, proc.log_path)
        except AssertionError as exc:
            raise SystemExit(str(exc)) from None
        yield proc


@contextmanager
def redis_server() -> Iterator[str | None]:
    """The URL of a throwaway redis-server on loopback, or None when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        log("redis-server not found: the Redis figures are skipped")
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        server = RedisServer(binary, Path(workdir))
        try:
            server.start()
            yield server.url
        finally:
            server.stop()


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


# -- 2, 3, 7. deploy to ready, unchanged redeploy, scale -----------------------------------


def plain_run(env: Env) -> tuple[float, dict[str, float]]:
    outdir = Path(tempfile.mkdtemp(prefix="plain-"))
    started = time.monotonic()
    result = subprocess.run(
        [PY, "-m", "bench.plain", str(outdir)],
        cwd=ROOT,
        env=env.vars(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    total = time.monotonic() - started
    shutil.rmtree(outdir, ignore_errors=True)
    if result.returncode:
        raise SystemExit(f"plain run failed:\n{result.stderr}")
    return total, json.loads(result.stdout.strip().splitlines()[-1])


def phase_durations(env: Env) -> dict[str, float]:
    from datetime import datetime

    data = json.loads(manage(env, "init_status", "--json").stdout)
    out = {}
    for p in data["run"]["phases"]:
        if p["started_at"] and p["finished_at"]:
            out[p["name"]] = (
                datetime.fromisoformat(p["finished_at"]) - datetime.fromisoformat(p["started_at"])
            ).total_seconds()
    return out


def deploy_to_ready(env: Env) -> tuple[float, dict[str, float]]:
    """From `start_init` to the first 200 of /init/readyz, with web and worker running."""
    reset(env)
    port = free_port()
    cmd = gunicorn_cmd("project.wsgi:application", port, 2, "-c", "project/gunicorn.conf.py")
    with worker(env), running(cmd, env.vars(), "deploy-web") as web:
        wait_http(f"http://127.0.0.1:{port}/init/livez", web, 60, lambda c: c == 200)
        started = time.monotonic()
        result = manage(env, "start_init")
        if result.returncode:
            raise SystemExit(f"start_init failed:\n{result.stderr}")
        # Every 100 ms: a not-ready probe queries the database, and probing every few
        # milliseconds would take CPU from the phases it measures (Kubernetes probes every
        # few seconds).
        wait_http(
            f"http://127.0.0.1:{port}/init/readyz", web, 3600, lambda c: c == 200, interval=0.1
        )
        total = time.monotonic() - started
    return total, phase_durations(env)


def deploy_figures(env: Env, reps: int) -> dict[str, Any]:
    ours, plains = [], []
    ours_phases: list[dict[str, float]] = []
    plain_phases: list[dict[str, float]] = []
    for rep in range(reps):
        total, phases = deploy_to_ready(env)
        ours.append(total)
        ours_phases.append(phases)
        ptotal, pphases = plain_run(env)
        plains.append(ptotal)
        plain_phases.append(pphases)
        log(
            f"deploy to ready ({env.broker_url.split(':')[0]}), rep {rep + 1}: "
            f"initpipeline {total:.2f} s, plain {ptotal:.2f} s"
        )
    ours_m, plain_m = median(ours), median(plains)
    per_phase = {
        name: round(
            1000
            * (median([p[name] for p in ours_phases]) - median([p[name] for p in plain_phases])),
            1,
        )
        for name in plain_phases[0]
    }
    return {
        "initpipeline_s": round(ours_m, 3),
        "plain_s": round(plain_m, 3),
        "overhead_ratio": round(ours_m / plain_m - 1, 3),
        "overhead_ms_per_phase_inside": per_phase,
        "phases_initpipeline_s": {
            k: round(median([p[k] for p in ours_phases]), 3) for k in ours_phases[0]
        },
        "phases_plain_s": {
            k: round(median([p[k] for p in plain_phases]), 3) for k in plain_phases[0]
        },
    }


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
    result = subprocess.run(
        [PY, "-m", "bench.hotpath"],
        cwd=ROOT,
        env=env.vars(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode:
        raise SystemExit(f"hot path failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


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


# -- report ----------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Measured {meta['date']} on {meta['machine']} (Python {meta['python']}), demo capped "
        f"to {meta['files']} source files, median of {meta['reps']} runs.",
        "",
        "**1. Time to first response** (Gunicorn start to the first 200 on a page needing no "
        "artifact; ratio to a bare Django project)",
        "",
        "| workers | " + " | ".join(PEERS) + " |",
        "|---|" + "---|" * len(PEERS),
    ]
    for workers, row in results["first_response"].items():
        cells = [f"{row[k]:.2f} s ({row['ratios'][k]:.2f}x)" for k in PEERS]
        lines.append(f"| {workers} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**2. Deploy to ready** (`start_init` to `/init/readyz` 200, against the same "
        "phases in one plain process)",
        "",
        "| broker | initpipeline | plain | overhead | per phase, inside the task (ms) |",
        "|---|---|---|---|---|",
    ]
    for broker, d in results["deploy"].items():
        per = ", ".join(f"{k} {v:+.0f}" for k, v in d["overhead_ms_per_phase_inside"].items())
        lines.append(
            f"| {broker} | {d['initpipeline_s']:.2f} s | {d['plain_s']:.2f} s | "
            f"{d['overhead_ratio'] * 100:+.1f}% | {per} |"
        )
    r = results["redeploy"]
    lines += [
        "",
        f"**3. Unchanged redeploy**: `start_init --wait` with every phase cached: "
        f"{r['start_init_wait_s']:.2f} s.",
        "",
    ]
    m = results["memory"]
    lines += [
        "**4. Memory** (PSS added to 4 Gunicorn workers once each used the "
        f"{m['one_copy_mib']} MiB LSA matrix)",
        "",
        "| loading | added PSS | copies of the matrix |",
        "|---|---|---|",
        f"| initpipeline artifact (mmap) | {m['mmap']['added_pss_mib']} MiB "
        f"| {m['mmap']['copies']} |",
        f"| pickle per worker | {m['pickle']['added_pss_mib']} MiB | {m['pickle']['copies']} |",
        "",
    ]
    h = results["hot_path"]
    lines += [
        f"**5. Hot path**: `artifact(name).get()` {h['artifact_get_ns']:.0f} ns, a module global "
        f"{h['global_ns']:.0f} ns (ratio {h['ratio']:.1f}x).",
        "",
    ]
    t = results["throughput"]
    lines += [
        f"**6. Throughput** ({t['client']}, 2 gthread workers): trivial view "
        f"{t['/bench/trivial']:.0f} req/s, `/init/livez` {t['/init/livez']:.0f} req/s "
        f"({t['ratios']['/init/livez']:.2f}x), `/init/readyz` {t['/init/readyz']:.0f} req/s "
        f"({t['ratios']['/init/readyz']:.2f}x).",
        "",
        "**7. Scale** (filesystem broker, one run each)",
        "",
        "| files | deploy to ready | plain | overhead | phases (initpipeline) |",
        "|---|---|---|---|---|",
    ]
    for files, d in results["scale"].items():
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in d["phases_initpipeline_s"].items())
        lines.append(
            f"| {files} | {d['initpipeline_s']:.1f} s | {d['plain_s']:.1f} s | "
            f"{d['overhead_ratio'] * 100:+.1f}% | {phases} |"
        )
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for i, (workers, row) in enumerate(results["first_response"].items()):
        xs = [j + i * 0.4 for j in range(len(PEERS))]
        ax.bar(xs, [row[k] for k in PEERS], width=0.4, label=f"{workers} workers")
    ax.set_xticks([j + 0.2 for j in range(len(PEERS))], list(PEERS), rotation=15)
    ax.set_ylabel("seconds")
    ax.set_title("Time to first response")
    ax.legend()
    ax = axes[0][1]
    brokers = list(results["deploy"])
    ax.bar(
        [b + "\ninitpipeline" for b in brokers],
        [results["deploy"][b]["initpipeline_s"] for b in brokers],
    )
    ax.bar([b + "\nplain" for b in brokers], [results["deploy"][b]["plain_s"] for b in brokers])
    ax.set_ylabel("seconds")
    ax.set_title("Deploy to ready vs one plain process")
    ax = axes[1][0]
    m = results["memory"]
    ax.bar(
        ["mmap artifact", "pickle per worker"],
        [m["mmap"]["added_pss_mib"], m["pickle"]["added_pss_mib"]],
    )
    ax.axhline(m["one_copy_mib"], color="grey", linestyle="--", label="one copy")
    ax.set_ylabel("MiB PSS added, 4 workers")
    ax.set_title("Memory")
    ax.legend()
    ax = axes[1][1]
    t = results["throughput"]
    keys = ["/bench/trivial", "/init/livez", "/init/readyz"]
    ax.bar(["trivial view", "livez", "readyz"], [t[k] for k in keys])
    ax.set_ylabel("requests/s")
    ax.set_title("Probe throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def remeasure(name: str, out: Path, env: Env) -> int:
    """Replace one figure of out/latest.json, using the artifacts the full run left."""
    results = json.loads((out / "latest.json").read_text())
    log(f"{name}, again")
    measure: dict[str, Callable[[], Any]] = {
        "memory": lambda: memory(env),
        "hot_path": lambda: hot_path(env),
        "throughput": lambda: throughput(env, 5),
    }
    results[name] = measure[name]()
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    chart(results, out / "latest.png")
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny workload: checks the harness")
    parser.add_argument("--reps", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--files", type=int, default=1500, help="source files in the workload")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--only",
        choices=["memory", "hot_path", "throughput"],
        help="measure one figure again over the last full run's state and results",
    )
    args = parser.parse_args(argv)
    if args.only:
        return remeasure(args.only, args.out, Env(files=args.files))
    if args.quick:
        args.reps, args.files = 1, 40
    workers_list = [2] if args.quick else [2, 4]
    seconds = 1 if args.quick else 5
    scale_files = [20, 40] if args.quick else [args.files, args.files * 2, args.files * 4]

    env = Env(files=args.files)
    results: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "files": args.files,
            "reps": args.reps,
        }
    }
    log("1. time to first response")
    results["first_response"] = time_to_first_response(env, args.reps, workers_list)
    log("2. deploy to ready")
    results["deploy"] = {"filesystem": deploy_figures(env, args.reps)}
    log("3. unchanged redeploy")
    results["redeploy"] = unchanged_redeploy(env, args.reps)
    log("4. memory")
    results["memory"] = memory(env)
    log("5. hot path")
    results["hot_path"] = hot_path(env)
    log("6. throughput")
    results["throughput"] = throughput(env, seconds)
    with redis_server() as url:
        if url:
            log("2. deploy to ready, Redis")
            results["deploy"]["redis"] = deploy_figures(
                Env(files=args.files, broker_url=url), args.reps
            )
    log("7. scale")
    results["scale"] = {}
    for files in scale_files:
        results["scale"][str(files)] = deploy_figures(Env(files=files), 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "latest.md").write_text(markdown(results))
    chart(results, args.out / "latest.png")
    print(markdown(results))
    log(f"wrote {args.out}/latest.json, latest.md, latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
