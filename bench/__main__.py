"""Benchmarks of initpipeline against what a user would do instead, side by side in one run.

    python -m bench                  # the full run (about 24 minutes on 2 cores)
    python -m bench --quick          # a tiny workload, to check the harness works
    python -m bench --only big flood # measure these figures again, into the last results

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import big, figures, monitoring, overhead, serving, shardfigures, startup, warmup
from bench.harness import ROOT, Env, compile_bytecode, log, redis_server
from bench.report import write

GIB = 1024**3


@dataclass
class Run:
    """What this run measures with: sizes, repetitions, durations."""

    files: int
    reps: int
    quick: bool
    workers_list: list[int] = field(default_factory=lambda: [2, 4])
    seconds: float = 5
    big_bytes: int = 2 * GIB
    #: The demo at 2,000 files and at its default size (no cap: 0; about 4,000), the largest
    #: last: its artifacts stay for `--only memory`.
    scale_files: list[int] = field(default_factory=lambda: [2000, 0])
    #: Empty shards in the per-shard cost figures (each against a phase of one).
    shard_counts: tuple[int, ...] = (64, 1000)
    #: Entries of the pickled model of the serving figures (6 million: about 5 s to load).
    serving_entries: int = 6_000_000

    @property
    def env(self) -> Env:
        return Env(files=self.files)


def _deploy(run: Run) -> dict[str, Any]:
    out = {"filesystem": overhead.compare(run.env, run.reps, label=" (filesystem)")}
    with redis_server() as url:
        if url:
            redis = Env(files=run.files, broker_url=url)
            out["redis"] = overhead.compare(redis, run.reps, label=" (redis)")
    return out


def _scale(run: Run) -> dict[str, Any]:
    return {
        str(files): overhead.compare(Env(files=files), run.reps, label=f" ({files or 'all'} files)")
        for files in run.scale_files
    }


#: Every figure, in the order of a full run. memory, hot_path and throughput measure the
#: state the deploys before them left (the last deploy's artifacts).
FIGURES: dict[str, Callable[[Run], Any]] = {
    "first_response": lambda r: figures.time_to_first_response(r.env, r.reps, r.workers_list),
    "startup": lambda r: startup.first_response(r.env, r.reps),
    "deploy": _deploy,
    "redeploy": lambda r: figures.unchanged_redeploy(r.env, r.reps),
    "memory": lambda r: figures.memory(r.env),
    "hot_path": lambda r: figures.hot_path(r.env),
    "throughput": lambda r: figures.throughput(r.env, r.seconds),
    "warmup_rates": lambda r: warmup.answers_per_second(r.env, r.reps, r.seconds),
    "flood": lambda r: warmup.flood(r.env, r.reps),
    "big": lambda r: big.figures(r.big_bytes, r.reps),
    "scale": _scale,
    "shards": lambda r: shardfigures.figures(r.files, r.reps, r.shard_counts),
    "serving": lambda r: serving.figures(r.serving_entries, r.quick),
    "monitoring": lambda r: monitoring.figures(r.files, r.reps, r.quick),
}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@contextmanager
def _timed(name: str, timings: dict[str, float]) -> Iterator[None]:
    started = time.monotonic()
    log(name)
    yield
    timings[name] = round(time.monotonic() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny workload: checks the harness")
    parser.add_argument("--reps", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--files", type=int, default=1500, help="source files in the workload")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(FIGURES),
        metavar="FIGURE",
        help=f"measure these figures again, into --out's latest.json: {', '.join(FIGURES)}",
    )
    args = parser.parse_args(argv)
    run = Run(files=args.files, reps=args.reps, quick=args.quick)
    if args.quick:
        run.reps, run.files, run.seconds = 1, 40, 1
        run.workers_list, run.big_bytes, run.scale_files = [2], 64 * 1024**2, [40, 80]
        run.shard_counts = (8,)
        run.serving_entries = 20_000

    results: dict[str, Any] = {}
    latest = args.out / "latest.json"
    if args.only and latest.exists():
        results = json.loads(latest.read_text())
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "files": run.files,
        "reps": run.reps,
        "quick": run.quick,
        "big_bytes": run.big_bytes,
        "scale_files": run.scale_files,
        "load_before": _load(),
    }
    compile_bytecode(*(ROOT / name for name in ("initpipeline", "project", "bench")))
    timings: dict[str, float] = {}
    for name in args.only or FIGURES:
        with _timed(name, timings):
            results[name] = FIGURES[name](run)
    meta["load_after"] = _load()
    meta["seconds"] = timings
    if args.only and "meta" in results:
        results["meta"].setdefault("remeasured", {}).update(
            {name: {**meta, "seconds": timings[name]} for name in args.only}
        )
    else:
        results["meta"] = meta

    args.out.mkdir(parents=True, exist_ok=True)
    write(results, args.out)
    log(f"wrote {args.out}/latest.json, latest.md, latest.png ({sum(timings.values()):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
