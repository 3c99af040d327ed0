"""What the test pipelines' phases share: the control file and the work a phase does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from initpipeline import PhaseContext


def var_dir() -> Path:
    return Path(os.environ["INITPIPELINE_VAR_DIR"])


def control() -> dict[str, Any]:
    try:
        return dict(json.loads((var_dir() / "control.json").read_text()))
    except FileNotFoundError:
        return {}


def do_work(ctx: PhaseContext) -> None:
    ctl = control()
    with open(var_dir() / "executions.log", "a") as log:
        log.write(f"{ctx.name} {ctx.run_id} {ctx.attempt} {os.getpid()}\n")
    seconds = float(ctl.get("sleep", {}).get(ctx.name, 0))
    steps = max(1, int(seconds / 0.1))
    message = ctl.get("message", {}).get(ctx.name)
    every = int(ctl.get("checkpoint", {}).get(ctx.name, 0))
    first = int(ctx.resumed["step"]) if every and ctx.resumed else 0
    with open(var_dir() / "starts.log", "a") as log:
        log.write(f"{ctx.name} {ctx.run_id} {first} {steps}\n")
    if ctx.name in ctl.get("quiet", []):
        time.sleep(seconds)  # no progress() or heartbeat() calls at all
        steps = first
    for i in range(first, steps):
        if seconds:
            time.sleep(seconds / steps)
        step = i + 1
        if every and step % every == 0 and step < steps:
            ctx.checkpoint({"step": step}, done=step, total=steps)
        ctx.progress(
            step,
            steps,
            message or f"step {step} of {steps}",
            checkpoint=(lambda step=step: {"step": step}) if every else None,
        )
    if ctx.name in ctl.get("fail", []):
        raise RuntimeError(f"{ctx.name} was told to fail")
    if ctx.attempt <= int(ctl.get("fail_attempts", {}).get(ctx.name, 0)):
        raise RuntimeError(f"{ctx.name} fails attempt {ctx.attempt}")
