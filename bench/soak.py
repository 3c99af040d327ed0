"""A soak: a pipeline of 10 minutes or more, a 1 GiB artifact, two workers, one of which is
SIGKILLed or SIGTERMed every 1 to 2 minutes. It must end succeeded with every artifact
verifying; the report says, per kill, how much work was redone.

    python -m bench.soak                    # make soak: about 15 minutes
    python -m bench.soak --scale 0.1        # the same, ten times shorter and smaller

Writes bench/results/soak.md and soak.json (or --out DIR). Not part of make test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.harness import PY, ROOT, log
from tests.servers import celery_worker, kill_group, spawn, wait_worker_ready

VAR = ROOT / "var" / "soak"
PHASES = ("prepare", "build_big", "check_big")


@dataclass
class Kill:
    at: float  # seconds since the start
    how: str  # SIGKILL or SIGTERM
    phase: str
    done: float  # the phase's progress (units) when it was killed
    total: float
    interval: float  # its checkpoint interval (units)
    resumed_at: float | None = None  # where the next start of the phase began
    exit_s: float | None = None  # how long a SIGTERMed worker took to exit

    @property
    def redone(self) -> float | None:
        return None if self.resumed_at is None else max(self.done - self.resumed_at, 0.0)


class Workers:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        logfile = VAR.parent / f"soak-{name}.log"
        proc = spawn(celery_worker("-n", f"{name}@%h"), self.env, logfile, ROOT)
        wait_worker_ready(proc, logfile)
        self.procs[name] = proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            kill_group(proc)


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="work and size (1: 10 min)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=[60, 120], metavar="S")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.soak_settings",
        "INITPIPELINE_VAR_DIR": str(VAR),
        "CELERY_BROKER_URL": "filesystem://",
        "PYTHONUNBUFFERED": "1",
        "SOAK_PREPARE_S": str(180 * args.scale),
        "SOAK_BIG_MIB": str(max(16, int(1024 * args.scale))),
        "SOAK_BIG_S": str(300 * args.scale),
        "SOAK_CHECK_S": str(120 * args.scale),
    }
    import shutil

    shutil.rmtree(VAR, ignore_errors=True)
    VAR.mkdir(parents=True)
    os.environ.update({k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "INITPIPELINE_VAR_DIR")})
    import django

    django.setup()
    from initpipeline import storage
    from initpipeline.models import Generation, PhaseRun, PipelineRun

    if manage(env, "migrate", "--noinput").returncode:
        raise SystemExit("migrate failed")
    workers = Workers(env)
    kills: list[Kill] = []
    began = time.monotonic()
    try:
        for name in ("soak0", "soak1"):
            workers.start(name)
        started = manage(env, "start_init")
        if started.returncode:
            raise SystemExit(started.stderr)
        run = PipelineRun.objects.get()
        log(f"run {run.pk} started; a kill every {args.kill_every[0]:g}-{args.kill_every[1]:g} s")
        next_kill = time.monotonic() + rng.uniform(*args.kill_every)
        while True:
            run.refresh_from_db()
            if not run.is_in_flight:
                break
            if time.monotonic() < next_kill:
                time.sleep(0.5)
                continue
            running = PhaseRun.objects.filter(run=run, state="running").first()
            if running is None:
                time.sleep(0.5)
                continue
            name = running.worker.split("@")[0]
            proc = workers.procs.get(name)
            if proc is None:
                time.sleep(0.5)
                continue
            how = "SIGKILL" if len(kills) % 2 == 0 else "SIGTERM"
            point = running.checkpoint or {}
            interval = (running.progress_total or 0) / (20 if running.name == "prepare" else 16)
            if running.name == "check_big":
                interval = (running.progress_total or 0) / 10
            kill = Kill(
                at=round(time.monotonic() - began, 1),
                how=how,
                phase=running.name,
                done=running.progress_done,
                total=running.progress_total or 0,
                interval=round(interval, 1),
            )
            t = time.monotonic()
            if how == "SIGKILL":
                kill_group(proc)
            else:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
                kill.exit_s = round(time.monotonic() - t, 1)
            log(
                f"{how} {name} in {kill.phase} at {kill.done:g}/{kill.total:g} "
                f"(checkpoint at {point.get('done')})"
                + (f", exited in {kill.exit_s} s" if kill.exit_s is not None else "")
            )
            kills.append(kill)
            workers.start(name)
            next_kill = time.monotonic() + rng.uniform(*args.kill_every)
        elapsed = time.monotonic() - began
        run.refresh_from_db()
        log(f"run {run.pk} {run.state} after {elapsed:.0f} s {run.error}")
        verified = {}
        generation = Generation.objects.filter(is_active=True).first()
        for art in generation.artifacts.all() if generation else []:
            storage.verify(art)  # raises if it does not verify
            verified[art.name] = art.size
    finally:
        workers.stop_all()
    # Where each phase (re)started, in order: a kill's resume point is the next start after it.
    starts: dict[str, list[float]] = {p: [] for p in PHASES}
    for line in (VAR / "starts.log").read_text().splitlines():
        phase, _, first, _ = line.split()
        starts[phase].append(float(first))
    used = dict.fromkeys(PHASES, 1)  # the first start of each phase is the fresh one
    for kill in kills:
        seq = starts[kill.phase]
        if used[kill.phase] < len(seq):
            kill.resumed_at = seq[used[kill.phase]]
            used[kill.phase] += 1
    rows = PhaseRun.objects.filter(run=run).order_by("position")
    result: dict[str, Any] = {
        "state": run.state,
        "seconds": round(elapsed, 1),
        "artifacts_verified": verified,
        "phases": {
            p.name: {"losses": p.losses, "handoffs": p.handoffs, "attempt": p.attempt} for p in rows
        },
        "kills": [{**asdict(k), "redone": k.redone} for k in kills],
        "goal_met": run.state == "succeeded"
        and all(k.redone is not None and k.redone <= k.interval for k in kills),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "soak.md").write_text(report(result, args))
    print(report(result, args))
    return 0 if result["goal_met"] else 1


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    sizes = ", ".join(
        f"{name} {size / 2**20:.0f} MiB" for name, size in result["artifacts_verified"].items()
    )
    lines = [
        f"Soak (`python -m bench.soak --scale {args.scale:g}`): run {result['state']} in "
        f"{result['seconds']:.0f} s, {len(result['kills'])} kills, every artifact verified "
        f"({sizes}).",
        "",
        "| # | at | signal | phase | progress at the kill | resumed from | redone "
        "| checkpoint interval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, k in enumerate(result["kills"], 1):
        resumed = "-" if k["resumed_at"] is None else f"{k['resumed_at']:g}"
        redone = "-" if k["redone"] is None else f"{k['redone']:g}"
        how = k["how"] + (f" (exited in {k['exit_s']} s)" if k["exit_s"] is not None else "")
        lines.append(
            f"| {n} | {k['at']:.0f} s | {how} | {k['phase']} | {k['done']:g} of {k['total']:g} | "
            f"{resumed} | {redone} | {k['interval']:g} |"
        )
    lines.append("")
    phases = ", ".join(
        f"{name}: {p['losses']} lost, {p['handoffs']} handed off, attempt {p['attempt']}"
        for name, p in result["phases"].items()
    )
    lines.append(
        f"Records: {phases}. Goal (each kill redoes at most one checkpoint interval): "
        f"{'met' if result['goal_met'] else 'NOT met'}."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
