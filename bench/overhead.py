"""Deploy to ready against the same phases in one plain process, and where the difference goes.

A deploy's timeline, from the bench's clock and the run's records (same host, same clock):

    start_init ──► first phase claimed ──► phase ... phase ──► generation active ──► readyz 200
    (command)      (queue: broker poll,      (hops between       (finish: its own     (the web's
                    task start, claim)        phases: the same)   task, activation)    look, poll)

Inside each phase, the worker logs what initpipeline itself took (execution.describe_costs):
publish (hash, fsync, rename), checkpoints, progress writes, loads, the record of the
outcome. A sharded phase adds its merge step and the hops between its tasks (its shards and
its merge; on one worker process they run one after the other). What remains of a phase's
difference to the plain process is "other": the CPU it shared with the web server and the
worker's main process, imports, noise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    PY,
    ROOT,
    Env,
    gunicorn_cmd,
    log,
    manage,
    reset,
    running,
    wait_http,
    wait_ready,
    worker,
)
from tests.servers import free_port

COSTS = re.compile(
    r"phase (\S+) of run (\d+): [\d.]+ s of ([\d.]+) s in initpipeline: (.*?); (.*)$", re.M
)
COST = re.compile(r"(\w+) ([\d.]+) s(?: \((\d+)\))?")

#: The causes, in the order the report lists them.
CAUSES = [
    "start_init",
    "queue",
    "hops",
    "finish",
    "readiness",
    "publish",
    "checkpoints",
    "progress",
    "heartbeats",
    "loads",
    "record",
    "merge",
    "shard_hops",
    "other",
]
CAUSE_TEXT = {
    "start_init": "start_init's process (checks, plan, send) above the plain one's start-up",
    "queue": "start_init's return to the first phase's claim (broker poll, task start, claim)",
    "hops": "between phases (the chain's next message, broker poll, claim)",
    "finish": "the last phase's end to the activation (the finish task)",
    "readiness": "the activation to readyz 200 (the web's look, the bench's 0.1 s poll)",
    "publish": "publishing artifacts (hash beside fsync, rename)",
    "checkpoints": "checkpoints the phases save",
    "progress": "progress writes and events",
    "heartbeats": "heartbeats the phases ask for",
    "loads": "looking up and checking upstream artifacts",
    "record": "recording each phase's outcome",
    "merge": "a sharded phase's merge step (the plain process runs the phase whole)",
    "shard_hops": "a sharded phase's hops between its tasks (shards, merge: broker, claim)",
    "other": "the rest of the phases' difference: below zero where the worker's heap, set "
    "aside from the garbage collector, makes them faster than alone; CPU shared with the web "
    "and the worker's main process; noise",
}


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


@dataclass
class Deploy:
    """One deploy to ready: its total, its phases' durations and its causes (seconds).

    With a load on the site: the requests ``wrk`` made and the CPU seconds the web server
    (master and workers) used meanwhile."""

    total: float
    phases: dict[str, float]
    causes: dict[str, float] = field(default_factory=dict)
    phase_costs: dict[str, dict[str, float]] = field(default_factory=dict)
    requests: int | None = None
    web_cpu_s: float | None = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of pid and its children (a Gunicorn master and workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    total = 0.0
    for p in [pid, *map(int, out.split())]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def worker_costs(text: str, run_id: int) -> dict[str, dict[str, float]]:
    """The cost lines (execution.describe_costs) the worker logged for run_id, by phase: a
    sharded phase's shards (``name#i``) and merge (``name``) added up, the merge's own time
    as "merge" (what of it initpipeline's costs above do not hold already)."""
    lines: dict[str, dict[str, float]] = {}
    for name, run, ran, inside, task in COSTS.findall(text):
        if int(run) != run_id:
            continue
        lines[name] = {
            "ran": float(ran),
            **{k: float(s) for k, s, _ in COST.findall(inside + ", " + task)},
        }
    out: dict[str, dict[str, float]] = {}
    for name, costs in lines.items():
        phase = name.split("#")[0]
        total = out.setdefault(phase, {})
        for k, v in costs.items():
            if k != "ran":
                total[k] = total.get(k, 0.0) + v
    for phase, total in out.items():
        if f"{phase}#0" in lines:
            merge = lines[phase]
            held = sum(v for k, v in merge.items() if k not in ("ran", "claim", "record"))
            total["merge"] = max(merge["ran"] - held, 0.0)
            # Not a cause: what _shard_hops takes off the phase's span for its merge task.
            total["merge_task"] = merge["ran"] + merge.get("claim", 0.0) + merge.get("record", 0.0)
    return out


def _shard_hops(phase: dict[str, Any], costs: dict[str, float]) -> float:
    """The part of a sharded phase's span that none of its tasks ran in: the phase's span
    less its shards' spans and its merge's (claim, run, record)."""
    shards = [s for s in phase.get("shards") or [] if s["started_at"] and s["finished_at"]]
    if not shards:
        return 0.0
    span = _ts(phase["finished_at"]) - _ts(phase["started_at"])  # type: ignore[operator]
    worked = sum(_ts(s["finished_at"]) - _ts(s["started_at"]) for s in shards)  # type: ignore[operator]
    return max(span - worked - costs.get("merge_task", 0.0), 0.0)


def deploy_to_ready(env: Env, *, load: str | None = None) -> Deploy:
    """From `start_init` to the first 200 of /init/readyz, with web and worker running.

    ``load``: a path of the site that `wrk` hammers from before start_init until ready.
    """
    reset(env)
    port = free_port()
    cmd = gunicorn_cmd("project.wsgi:application", port, 2, "-c", "project/gunicorn.conf.py")
    with worker(env) as work, running(cmd, env.vars(), "deploy-web") as web:
        wait_http(f"http://127.0.0.1:{port}/init/livez", web, 60, lambda c: c == 200)
        hammer = _hammer(f"http://127.0.0.1:{port}{load}") if load else None
        cpu_before = cpu_seconds(web.proc.pid)
        requests = None
        try:
            t0 = time.time()
            started = time.monotonic()
            result = manage(env, "start_init")
            t_cmd = time.time()
            if result.returncode:
                raise SystemExit(f"start_init failed:\n{result.stderr}")
            wait_ready(port, env, [web, work])
            total = time.monotonic() - started
            t_ready = time.time()
            web_cpu = cpu_seconds(web.proc.pid) - cpu_before
        finally:
            if hammer is not None:
                # wrk prints its summary when interrupted.
                hammer.send_signal(signal.SIGINT)
                found = re.search(r"(\d+) requests in", hammer.communicate(timeout=30)[0])
                requests = int(found.group(1)) if found else None
        text = work.log()
    status = json.loads(manage(env, "init_status", "--json").stdout)
    deploy = _deploy(status, text, total, t0, t_cmd, t_ready)
    deploy.web_cpu_s, deploy.requests = web_cpu, requests
    return deploy


def _hammer(url: str) -> subprocess.Popen[str]:
    """wrk on url for as long as it takes (interrupted by the caller)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install -y wrk): the flood needs it")
    # At the lowest priority: a crowd's own CPU is elsewhere, not on the server's cores.
    return subprocess.Popen(
        ["nice", "-n", "19", wrk, "-t1", "-c8", "-d3600s", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _deploy(
    status: dict[str, Any], worker_log: str, total: float, t0: float, t_cmd: float, t_ready: float
) -> Deploy:
    run = status["run"]
    phases = [p for p in run["phases"] if p["started_at"] and p["finished_at"]]
    durations = {p["name"]: _ts(p["finished_at"]) - _ts(p["started_at"]) for p in phases}  # type: ignore[operator]
    activated = _ts((status["active_generation"] or {}).get("activated_at"))
    deploy = Deploy(total=total, phases=durations)
    deploy.phase_costs = worker_costs(worker_log, run["id"])
    for p in phases:
        if p.get("shards"):
            costs = deploy.phase_costs.setdefault(p["name"], {})
            costs["shard_hops"] = _shard_hops(p, costs)
    if phases and activated is not None:
        first, last = _ts(phases[0]["started_at"]), _ts(phases[-1]["finished_at"])
        hops = sum(
            _ts(b["started_at"]) - _ts(a["finished_at"])  # type: ignore[operator]
            for a, b in zip(phases, phases[1:], strict=False)
        )
        deploy.causes = {
            "start_init": t_cmd - t0,
            "queue": first - t_cmd,  # type: ignore[operator]
            "hops": hops,
            "finish": activated - last,  # type: ignore[operator]
            "readiness": t_ready - activated,
        }
    return deploy


def plain_run(env: Env) -> tuple[float, dict[str, float]]:
    """The same phases in one plain process (bench/plain.py): total and per phase."""
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


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def compare(env: Env, reps: int, *, label: str = "") -> dict[str, Any]:
    """Deploy to ready and the plain process, alternately, reps times; medians and causes."""
    ours: list[Deploy] = []
    plains: list[tuple[float, dict[str, float]]] = []
    for rep in range(reps):
        ours.append(deploy_to_ready(env))
        plains.append(plain_run(env))
        log(
            f"deploy to ready{label}, rep {rep + 1}: initpipeline {ours[-1].total:.2f} s, "
            f"plain {plains[-1][0]:.2f} s"
        )
    return summarise(ours, plains)


def summarise(ours: list[Deploy], plains: list[tuple[float, dict[str, float]]]) -> dict[str, Any]:
    names = list(plains[0][1])
    ours_m = median([d.total for d in ours])
    plain_m = median([p[0] for p in plains])
    plain_phases = {n: median([p[1][n] for p in plains]) for n in names}
    our_phases = {n: median([d.phases.get(n, 0.0) for d in ours]) for n in names}
    plain_startup = median([p[0] - sum(p[1].values()) for p in plains])
    causes = {k: median([d.causes.get(k, 0.0) for d in ours]) for k in CAUSES[:5]}
    causes["start_init"] -= plain_startup
    inside = dict.fromkeys(CAUSES[5:-1], 0.0)
    per_phase: dict[str, dict[str, float]] = {}
    for n in names:
        costs = {k: median([d.phase_costs.get(n, {}).get(k, 0.0) for d in ours]) for k in inside}
        diff = our_phases[n] - plain_phases[n]
        costs["other"] = diff - sum(costs.values())
        per_phase[n] = {"difference": round(diff, 3), **{k: round(v, 3) for k, v in costs.items()}}
        for k in inside:
            inside[k] += costs[k]
    causes.update(inside)
    causes["other"] = sum(p["other"] for p in per_phase.values())
    return {
        "initpipeline_s": round(ours_m, 3),
        "plain_s": round(plain_m, 3),
        "overhead_ratio": round(ours_m / plain_m - 1, 3),
        "causes_s": {k: round(causes.get(k, 0.0), 3) for k in CAUSES},
        "per_phase_s": per_phase,
        "phases_initpipeline_s": {k: round(v, 3) for k, v in our_phases.items()},
        "phases_plain_s": {k: round(v, 3) for k, v in plain_phases.items()},
        "runs_s": {
            "initpipeline": [round(d.total, 3) for d in ours],
            "plain": [round(p[0], 3) for p in plains],
        },
    }
