"""The soak's pipeline: three long phases that checkpoint, one artifact of SOAK_BIG_MIB.

    prepare ──► build_big ──► check_big

Every start of a phase appends "<phase> <run> <first unit> <units>" to
``$INITPIPELINE_VAR_DIR/starts.log``: where it (re)started, which is what a kill cost.
Sizes and rates come from the environment (bench/soak.py sets them).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from initpipeline import PhaseContext, phase

MIB = 1024 * 1024


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _started(ctx: PhaseContext, first: int, units: int) -> None:
    log = Path(os.environ["INITPIPELINE_VAR_DIR"]) / "starts.log"
    with open(log, "a") as fh:
        fh.write(f"{ctx.name} {ctx.run_id} {first} {units}\n")


def block(i: int) -> bytes:
    """Block ``i`` of the big artifact: 1 MiB anyone can recompute."""
    seed = hashlib.sha256(f"initpipeline soak block {i}".encode()).digest()
    return (seed * (MIB // len(seed)))[:MIB]


def _config() -> dict[str, float]:
    return {
        "prepare_s": _env("SOAK_PREPARE_S", 180),
        "big_mib": _env("SOAK_BIG_MIB", 1024),
        "big_s": _env("SOAK_BIG_S", 300),
        "check_s": _env("SOAK_CHECK_S", 120),
    }


@phase(produces="prepared", config=_config)
def prepare(ctx: PhaseContext) -> None:
    """Work in 0.1 s steps, checkpointing every 5 %."""
    steps = int(ctx.config["prepare_s"] * 10)
    state = ctx.resumed or {"step": 0, "acc": ""}
    _started(ctx, int(state["step"]), steps)
    every = max(1, steps // 20)
    for i in range(int(state["step"]), steps):
        time.sleep(0.1)
        state = {"step": i + 1, "acc": hashlib.sha256(f"{state['acc']}{i}".encode()).hexdigest()}
        if state["step"] % every == 0:
            ctx.checkpoint(state, done=i + 1, total=steps)
        ctx.progress(i + 1, steps, f"step {i + 1} of {steps}", checkpoint=lambda s=state: s)
    ctx.save_json("prepared", state)


@phase(produces="big", after="prepare", config=_config)
def build_big(ctx: PhaseContext) -> None:
    """Write the big artifact block by block, checkpointing every 1/16 of it.

    The partial file is a scratch file of this host; the checkpoint names it and how many
    blocks it holds. A copy resuming elsewhere (no such file) starts over; one resuming
    here copies those blocks into its own file first, so that a copy that lost the phase
    and still writes cannot touch what this one publishes.
    """
    blocks = int(ctx.config["big_mib"])
    pause = ctx.config["big_s"] / blocks
    state = ctx.resumed or {"blocks": 0, "path": ""}
    path = ctx.scratch_path(".bin")
    first = 0
    previous = Path(state["path"]) if state["path"] else None
    if (
        previous is not None
        and previous.exists()
        and previous.stat().st_size >= state["blocks"] * MIB
    ):
        with open(previous, "rb") as src, open(path, "wb") as dst:
            remaining = state["blocks"] * MIB
            while remaining:
                chunk = src.read(min(remaining, 8 * MIB))
                dst.write(chunk)
                remaining -= len(chunk)
        first = int(state["blocks"])
    _started(ctx, first, blocks)
    every = max(1, blocks // 16)
    with open(path, "ab") as fh:
        for i in range(first, blocks):
            started = time.monotonic()
            fh.write(block(i))
            done = i + 1
            if done % every == 0 and done < blocks:
                fh.flush()
                os.fsync(fh.fileno())
                ctx.checkpoint({"blocks": done, "path": str(path)}, done=done, total=blocks)

            def snapshot(done: int = done) -> dict[str, object]:
                fh.flush()
                os.fsync(fh.fileno())
                return {"blocks": done, "path": str(path)}

            ctx.progress(done, blocks, f"block {done} of {blocks}", checkpoint=snapshot)
            time.sleep(max(0.0, pause - (time.monotonic() - started)))
    ctx.save_file("big", path)


@phase(produces="checked", after="build_big", config=_config)
def check_big(ctx: PhaseContext) -> None:
    """Read the big artifact back and compare every block, checkpointing every 10 %."""
    blocks = int(ctx.config["big_mib"])
    pause = ctx.config["check_s"] / blocks
    path = ctx.load("big")  # verified against its sha256 first
    state = ctx.resumed or {"block": 0}
    _started(ctx, int(state["block"]), blocks)
    every = max(1, blocks // 10)
    with open(path, "rb") as fh:
        fh.seek(int(state["block"]) * MIB)
        for i in range(int(state["block"]), blocks):
            started = time.monotonic()
            if fh.read(MIB) != block(i):
                raise RuntimeError(f"block {i} of the big artifact is wrong")
            done = i + 1
            if done % every == 0 and done < blocks:
                ctx.checkpoint({"block": done}, done=done, total=blocks)
            ctx.progress(
                done, blocks, f"checked {done} of {blocks}", checkpoint=lambda d=done: {"block": d}
            )
            time.sleep(max(0.0, pause - (time.monotonic() - started)))
    ctx.save_json("checked", {"blocks": blocks})
