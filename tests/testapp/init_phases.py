"""A small pipeline the tests steer through a JSON control file shared by every process.

    a ──► b ──► c

The control file (``$INITPIPELINE_VAR_DIR/control.json``) may hold:
  versions: {phase: str}   goes into the phase's config, so its fingerprint changes
  fail:     [phase, ...]   the phase raises
  sleep:    {phase: s}     the phase works this long, reporting progress
  fail_attempts: {phase: n}  the phase raises on its first n attempts
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from initpipeline import PhaseContext, phase


def control() -> dict[str, Any]:
    path = Path(os.environ["INITPIPELINE_VAR_DIR"]) / "control.json"
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {}


def _config(name: str) -> Any:
    return lambda: {"v": control().get("versions", {}).get(name, "1")}


def _work(ctx: PhaseContext) -> None:
    ctl = control()
    seconds = float(ctl.get("sleep", {}).get(ctx.name, 0))
    steps = max(1, int(seconds / 0.1))
    for i in range(steps):
        if seconds:
            time.sleep(seconds / steps)
        ctx.progress(i + 1, steps, f"step {i + 1} of {steps}")
    if ctx.name in ctl.get("fail", []):
        raise RuntimeError(f"{ctx.name} was told to fail")
    if ctx.attempt <= int(ctl.get("fail_attempts", {}).get(ctx.name, 0)):
        raise RuntimeError(f"{ctx.name} fails attempt {ctx.attempt}")


@phase(produces="a_out", config=_config("a"))
def a(ctx: PhaseContext) -> None:
    _work(ctx)
    ctx.save_json("a_out", {"numbers": list(range(10)), "v": ctx.config["v"]})


@phase(produces="b_out", after="a", config=_config("b"))
def b(ctx: PhaseContext) -> None:
    numbers = ctx.load("a_out")["numbers"]
    _work(ctx)
    import numpy as np

    # The version shows in the bytes, so a bumped b publishes a different file.
    ctx.save_array("b_out", np.asarray(numbers, dtype=np.float32) * 2 + float(ctx.config["v"]))


@phase(produces="c_out", inputs=["b_out"], config=_config("c"), retries=2)
def c(ctx: PhaseContext) -> None:
    total = float(ctx.load("b_out").sum())
    _work(ctx)
    ctx.save_json("c_out", {"total": total, "attempt": ctx.attempt})
