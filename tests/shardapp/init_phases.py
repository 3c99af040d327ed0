"""A pipeline with a sharded phase, for the shard tests.

    numbers ──► squares (shards, merged by default) ──► total

Steered by tests/testapp's control file:
  shards: n              how many shards squares has (4 by default)
  sleep: {"squares": s}  each shard works this long, in 0.1 s steps, reporting progress
  checkpoint: {"squares": n}  each shard checkpoints every n steps and resumes from it
  fail_shards: [i, ...]  these shards raise (after shard_sleep, if any)
  shard_sleep: {"i": s}  shard i waits this long first

Every start of a shard appends "<run> <index> <first step> <pid> <worker>" to
``$INITPIPELINE_VAR_DIR/shards.log``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from initpipeline import PhaseContext, phase
from tests.testapp.work import control, var_dir

COUNT = 40


@phase(produces="numbers")
def numbers(ctx: PhaseContext) -> None:
    ctx.save_json("numbers", list(range(COUNT)))


def _config() -> dict[str, Any]:
    return {"shards": int(control().get("shards", 4))}


@phase(
    produces=["squares", "vectors"],
    inputs=["numbers"],
    config=_config,
    shards=lambda config: int(config["shards"]),
)
def squares(ctx: PhaseContext) -> None:
    assert ctx.shard is not None
    ctl = control()
    nums = ctx.load("numbers")
    mine = [nums[i] for i in ctx.shard.slice(len(nums))]
    seconds = float(ctl.get("sleep", {}).get("squares", 0))
    steps = max(1, int(seconds / 0.1))
    every = int(ctl.get("checkpoint", {}).get("squares", 0))
    first = int(ctx.resumed["step"]) if every and ctx.resumed else 0
    with open(var_dir() / "shards.log", "a") as log:
        log.write(f"{ctx.run_id} {ctx.shard.index} {first} {os.getpid()} {ctx.worker}\n")
    for i in range(first, steps):
        time.sleep(seconds / steps)
        step = i + 1
        if every and step % every == 0 and step < steps:
            ctx.checkpoint({"step": step}, done=step, total=steps)
        ctx.progress(step, steps, f"shard {ctx.shard.index}: step {step} of {steps}")
    time.sleep(float(ctl.get("shard_sleep", {}).get(str(ctx.shard.index), 0)))
    if ctx.shard.index in ctl.get("fail_shards", []):
        raise RuntimeError(f"shard {ctx.shard.index} was told to fail")
    ctx.save_json("squares", [n * n for n in mine])
    ctx.save_array("vectors", np.array([[n, n * n] for n in mine], dtype=np.float32).reshape(-1, 2))


@phase(produces="total", inputs=["squares", "vectors"])
def total(ctx: PhaseContext) -> None:
    values = ctx.load("squares")
    vectors = ctx.load("vectors")
    ctx.save_json(
        "total",
        {"sum": sum(values), "rows": int(vectors.shape[0]), "column": float(vectors[:, 1].sum())},
    )
