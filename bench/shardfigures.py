"""The figures of sharded phases: the demo's deploy to ready on one worker process against
two (its first phase is sharded), and what a shard costs the orchestration on Redis.

    python -m bench --only shards            # into bench/results/latest.*, with the rest
    python -m bench.shardfigures [--files N] [--reps N] [--out DIR]   # shards.json, .md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.harness import ROOT, VAR, Env, log, manage, redis_server, reset, running
from tests.servers import celery_worker, wait_worker_ready


def _worker(stack: ExitStack, env: dict[str, str], concurrency: int) -> None:
    """A worker with ``concurrency`` pool processes, until ``stack`` closes."""
    cmd = celery_worker("-n", "bench@%h", concurrency=concurrency)
    proc = stack.enter_context(running(cmd, env, f"shards-worker-{concurrency}"))
    wait_worker_ready(proc.proc, proc.log_path)


def deploy_seconds(env: Env, processes: int) -> float:
    """``start_init --wait`` of the demo from scratch, with ``processes`` worker processes."""
    reset(env)
    with ExitStack() as stack:
        _worker(stack, env.vars(), processes)
        started = time.monotonic()
        result = manage(env, "start_init", "--wait")
        if result.returncode:
            raise SystemExit(f"the demo's run failed:\n{result.stderr[-2000:]}")
        return time.monotonic() - started


def deploy_by_processes(files: int, reps: int) -> dict[str, Any]:
    env = Env(files=files, extra={"SEARCH_SHARDS": "4"})
    times: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(reps):
        for processes in (1, 2):
            times[processes].append(deploy_seconds(env, processes))
            took = times[processes][-1]
            log(f"demo, {processes} worker process(es), rep {rep + 1}: {took:.2f} s")
    one, two = (statistics.median(times[n]) for n in (1, 2))
    return {"files": files, "one_s": one, "two_s": two, "ratio": two / one, "goal": 0.6}


def figures(files: int, reps: int, count: int = 64) -> dict[str, Any]:
    """Both figures, as ``make bench`` records them."""
    return {"deploy": deploy_by_processes(files, reps), "cost": shard_cost(reps, count)}


def shard_cost(reps: int, count: int = 64) -> dict[str, Any]:
    """Per-shard orchestration cost: tests/shardapp with ``count`` empty shards against 1,
    on Redis."""
    with redis_server() as url:
        if url is None:
            return {"skipped": "redis-server is not installed"}
        base = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "INITPIPELINE_VAR_DIR": str(VAR / "shards"),
            "INITPIPELINE_TEST_PIPELINE": "shards",
            "CELERY_BROKER_URL": url,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        seconds: dict[int, list[float]] = {1: [], count: []}
        for rep in range(reps):
            for n in (1, count):
                took = _shard_run(base, n)
                seconds[n].append(took)
                log(f"{n} empty shard(s), rep {rep + 1}: {took:.2f} s")
    one, many = (statistics.median(seconds[n]) for n in (1, count))
    return {
        "count": count,
        "one_s": one,
        "many_s": many,
        "per_shard_ms": (many - one) / (count - 1) * 1000,
        "goal_ms": 20,
    }


def _shard_run(base: dict[str, str], count: int) -> float:
    var = Path(base["INITPIPELINE_VAR_DIR"])
    shutil.rmtree(var, ignore_errors=True)
    var.mkdir(parents=True)
    (var / "control.json").write_text(json.dumps({"shards": count}))
    env = {**Env(files=0).vars(), **base}

    def manage_(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    if manage_("migrate", "--noinput").returncode:
        raise SystemExit("migrate failed")
    with ExitStack() as stack:
        _worker(stack, env, 2)
        started = time.monotonic()
        result = manage_("start_init", "--wait")
        if result.returncode:
            raise SystemExit(f"the shard run failed:\n{result.stderr[-2000:]}")
        return time.monotonic() - started


def markdown(results: dict[str, Any]) -> str:
    deploy, cost = results["deploy"], results["cost"]
    lines = [
        "| figure | one | other | ratio or cost | goal |",
        "|---|---|---|---|---|",
        f"| demo deploy to ready ({deploy['files']} files, first phase in 4 shards): 1 worker "
        f"process vs 2 | {deploy['one_s']:.2f} s | {deploy['two_s']:.2f} s | "
        f"{deploy['ratio']:.2f}x | <= {deploy['goal']}x |",
    ]
    if "skipped" in cost:
        lines.append(f"| per-shard cost on Redis | skipped: {cost['skipped']} | | | |")
    else:
        lines.append(
            f"| orchestration per shard on Redis ({cost['count']} empty shards vs 1) | "
            f"{cost['one_s']:.2f} s | {cost['many_s']:.2f} s | "
            f"{cost['per_shard_ms']:.1f} ms a shard | "
            f"<= {cost['goal_ms']} ms |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    results = figures(args.files, args.reps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shards.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "shards.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
