"""The figures of sharded phases: the demo's deploy to ready on one worker process against
two (its first phase is sharded), what a shard costs the orchestration on Redis with
PostgreSQL at 64 and at 1,000 shards, and the queries (and rows read) of one shard's
success at 8, 64 and 1,000 shards.

    python -m bench --only shards            # into bench/results/latest.*, with the rest
    python -m bench.shardfigures [--files N] [--reps N] [--out DIR]   # shards.json, .md
    python -m bench.shardfigures queries 8 64 1000   # one process's count, as JSON
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

from bench.harness import (
    ROOT,
    VAR,
    Env,
    log,
    manage,
    postgres_server,
    redis_server,
    reset,
    running,
)
from tests.servers import celery_worker, wait_worker_ready

#: Shard counts of the query figure (the last is the largest cost figure's count).
QUERY_COUNTS = (8, 64, 1000)


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


def figures(files: int, reps: int, counts: tuple[int, ...] = (64, 1000)) -> dict[str, Any]:
    """The three figures, as ``make bench`` records them."""
    return {"deploy": deploy_by_processes(files, reps), "cost": shard_cost(reps, counts)}


def shard_cost(reps: int, counts: tuple[int, ...] = (64, 1000)) -> dict[str, Any]:
    """Per-shard orchestration cost: tests/shardapp with each of ``counts`` empty shards
    against 1, on Redis and PostgreSQL (SQLite when no PostgreSQL is installed); then the
    queries of one shard's success at QUERY_COUNTS shards, on the same database."""
    with redis_server() as url, postgres_server() as database:
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
        base.pop("DATABASE_URL", None)
        if database is not None:
            base["DATABASE_URL"] = database
        seconds: dict[int, list[float]] = {n: [] for n in (1, *counts)}
        for rep in range(reps):
            for n in seconds:
                took = _shard_run(base, n)
                seconds[n].append(took)
                log(f"{n} empty shard(s), rep {rep + 1}: {took:.2f} s")
        queries = _queries(base, sorted({*QUERY_COUNTS, *counts}))
    one = statistics.median(seconds[1])
    by_count = {}
    for n in counts:
        many = statistics.median(seconds[n])
        by_count[str(n)] = {"many_s": many, "per_shard_ms": (many - one) / (n - 1) * 1000}
    return {
        "database": "postgresql" if database is not None else "sqlite",
        "one_s": one,
        "counts": by_count,
        "goal_ms": 20,
        "queries": queries,
    }


def _fresh_database(env: dict[str, str]) -> None:
    """An empty database for tests/settings.py under ``env``: a PostgreSQL one dropped and
    made again, or no SQLite file."""
    var = Path(env["INITPIPELINE_VAR_DIR"])
    if "DATABASE_URL" not in env:
        Path(var.parent / f"{var.name}-db.sqlite3").unlink(missing_ok=True)
        return
    import psycopg

    name = "test_initpipeline_" + "".join(c if c.isalnum() else "_" for c in var.name)
    server = env["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")


def _prepare(base: dict[str, str], count: int) -> dict[str, str]:
    """A fresh var folder and database for a run of ``count`` shards, migrated."""
    var = Path(base["INITPIPELINE_VAR_DIR"])
    shutil.rmtree(var, ignore_errors=True)
    var.mkdir(parents=True)
    (var / "control.json").write_text(json.dumps({"shards": count}))
    env = {**Env(files=0).vars(), **base}
    if "DATABASE_URL" not in base:
        env.pop("DATABASE_URL", None)
    _fresh_database(env)
    migrated = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if migrated.returncode:
        raise SystemExit(f"migrate failed:\n{migrated.stderr[-2000:]}")
    return env


def _queries(base: dict[str, str], counts: list[int]) -> dict[str, dict[str, int]]:
    """The queries and rows read of one shard's success at each of ``counts`` shards."""
    env = _prepare(base, 1)
    result = subprocess.run(
        [sys.executable, "-m", "bench.shardfigures", "queries", *map(str, counts)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode:
        raise SystemExit(f"the query count failed:\n{result.stderr[-2000:]}")
    found: dict[str, dict[str, int]] = json.loads(result.stdout.strip().splitlines()[-1])
    log(
        "one shard's success: "
        + ", ".join(
            f"{n} shards {q['queries']} queries, {q['rows']} rows" for n, q in found.items()
        )
    )
    return found


def count_queries(counts: list[int]) -> dict[str, dict[str, int]]:
    """In this process (Django set up): tests/records.py's shard_success_cost at each count."""
    from tests.records import shard_success_cost

    found = {}
    for n in counts:
        queries, rows = shard_success_cost(n)
        found[str(n)] = {"queries": queries, "rows": rows}
    return found


def _shard_run(base: dict[str, str], count: int) -> float:
    env = _prepare(base, count)

    def manage_(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

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
        return "\n".join(lines) + "\n"
    if "counts" not in cost:  # results of a release before the 1,000-shard figure
        lines.append(
            f"| orchestration per shard on Redis ({cost['count']} empty shards vs 1) | "
            f"{cost['one_s']:.2f} s | {cost['many_s']:.2f} s | "
            f"{cost['per_shard_ms']:.1f} ms a shard | <= {cost['goal_ms']} ms |"
        )
        return "\n".join(lines) + "\n"
    database = "PostgreSQL" if cost["database"] == "postgresql" else "SQLite"
    for n, c in cost["counts"].items():
        lines.append(
            f"| orchestration per shard on Redis and {database} ({n} empty shards vs 1) | "
            f"{cost['one_s']:.2f} s | {c['many_s']:.2f} s | {c['per_shard_ms']:.1f} ms a shard "
            f"| <= {cost['goal_ms']} ms |"
        )
    q = cost["queries"]
    counts = list(q)
    lines.append(
        f"| queries (rows read) of one shard's success, {' / '.join(counts)} shards | "
        f"{q[counts[0]]['queries']} ({q[counts[0]]['rows']}) | "
        f"{q[counts[-1]]['queries']} ({q[counts[-1]]['rows']}) | "
        f"{' / '.join(str(q[n]['queries']) for n in counts)} queries | constant |"
    )
    return "\n".join(lines) + "\n"


def queries_constant(cost: dict[str, Any]) -> bool:
    """Whether one shard's success cost the same queries and rows at every count."""
    return len({(q["queries"], q["rows"]) for q in cost["queries"].values()}) == 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["queries"]:
        import django

        django.setup()
        print(json.dumps(count_queries([int(n) for n in argv[1:]])))
        return 0
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
