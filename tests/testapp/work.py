"""What the test pipelines' phases share: the control file and the work a phase does."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from initpipeline import PhaseContext

# A held phase gives up after this many of its 0.1 s steps: a test that never lets it go
# fails instead of hanging.
HOLD_STEPS = 1200


def var_dir() -> Path:
    return Path(os.environ["INITPIPELINE_VAR_DIR"])


def control() -> dict[str, Any]:
    try:
        return dict(json.loads((var_dir() / "control.json").read_text()))
    except FileNotFoundError:
        return {}


def _trace(ctx: PhaseContext, kind: str, step: int) -> None:
    """Note a call to progress() or heartbeat() in calls.log, before it is made."""
    with open(var_dir() / "calls.log", "a") as log:
        log.write(f"{ctx.name} {ctx.run_id} {ctx.attempt} {kind} {step} {time.time():.6f}\n")


def _first_copy(ctx: PhaseContext) -> bool:
    """No copy of this phase was lost yet in this run (a loss is not a new attempt)."""
    from initpipeline.models import PhaseRun

    return PhaseRun.objects.filter(run_id=ctx.run_id, name=ctx.name, losses=0).exists()


def do_work(ctx: PhaseContext) -> None:
    ctl = control()
    with open(var_dir() / "executions.log", "a") as log:
        log.write(f"{ctx.name} {ctx.run_id} {ctx.attempt} {os.getpid()}\n")
    beating = float(ctl.get("heartbeat", {}).get(ctx.name, 0))
    silent = float(ctl.get("silent", {}).get(ctx.name, 0))
    if beating:
        # Alive by heartbeat() alone: never a progress() call.
        steps = max(1, int(beating / 0.1))
        for i in range(steps):
            time.sleep(beating / steps)
            _trace(ctx, "heartbeat", i + 1)
            ctx.heartbeat()
    elif silent and _first_copy(ctx):
        # No sign of life: read (never write) the record until recovery takes it from us.
        from initpipeline.models import PhaseRun

        mine = PhaseRun.objects.filter(run_id=ctx.run_id, name=ctx.name, losses=0, state="running")
        deadline = time.monotonic() + silent
        while mine.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    else:
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
            _trace(ctx, "progress", step)
            ctx.progress(
                step,
                steps,
                message or f"step {step} of {steps}",
                checkpoint=(lambda step=step: {"step": step}) if every else None,
            )
        held = 0
        while ctx.name in control().get("hold", []):
            if held >= HOLD_STEPS:
                raise RuntimeError(f"{ctx.name} was held for {HOLD_STEPS // 10} s")
            time.sleep(0.1)
            held += 1
            _trace(ctx, "progress", steps + held)
            ctx.progress(held, HOLD_STEPS, message or f"held: step {held}")
    if ctx.name in ctl.get("fail", []):
        text = ctl.get("fail_text", {}).get(ctx.name)
        if text:
            raise RuntimeError(text)
        raise RuntimeError(f"{ctx.name} was told to fail")
    if ctx.attempt <= int(ctl.get("fail_attempts", {}).get(ctx.name, 0)):
        raise RuntimeError(f"{ctx.name} fails attempt {ctx.attempt}")
