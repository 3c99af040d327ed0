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
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import figures
from bench.harness import ROOT, Env, log, redis_server
from bench.report import write


def remeasure(name: str, out: Path, env: Env) -> int:
    """Replace one figure of out/latest.json, using the artifacts the full run left."""
    results = json.loads((out / "latest.json").read_text())
    log(f"{name}, again")
    measure: dict[str, Callable[[], Any]] = {
        "memory": lambda: figures.memory(env),
        "hot_path": lambda: figures.hot_path(env),
        "throughput": lambda: figures.throughput(env, 5),
    }
    results[name] = measure[name]()
    write(results, out)
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
    results["first_response"] = figures.time_to_first_response(env, args.reps, workers_list)
    log("2. deploy to ready")
    results["deploy"] = {"filesystem": figures.deploy_figures(env, args.reps)}
    log("3. unchanged redeploy")
    results["redeploy"] = figures.unchanged_redeploy(env, args.reps)
    log("4. memory")
    results["memory"] = figures.memory(env)
    log("5. hot path")
    results["hot_path"] = figures.hot_path(env)
    log("6. throughput")
    results["throughput"] = figures.throughput(env, seconds)
    with redis_server() as url:
        if url:
            log("2. deploy to ready, Redis")
            results["deploy"]["redis"] = figures.deploy_figures(
                Env(files=args.files, broker_url=url), args.reps
            )
    log("7. scale")
    results["scale"] = figures.scale(scale_files)

    args.out.mkdir(parents=True, exist_ok=True)
    write(results, args.out)
    log(f"wrote {args.out}/latest.json, latest.md, latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
