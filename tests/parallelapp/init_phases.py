"""A pipeline with two independent branches, for the parallel-phase tests.

    left  ──┐
            ├──► join
    right ──┘

Steered by tests/testapp's control file (sleep, fail, versions; see tests/testapp/work.py).
"""

from __future__ import annotations

from typing import Any

from initpipeline import PhaseContext, phase
from tests.testapp.work import control, do_work


def _config(name: str) -> Any:
    return lambda: {"v": control().get("versions", {}).get(name, "1")}


@phase(produces="left_out", config=_config("left"))
def left(ctx: PhaseContext) -> None:
    do_work(ctx)
    ctx.save_json("left_out", {"side": "left", "v": ctx.config["v"]})


@phase(produces="right_out", config=_config("right"))
def right(ctx: PhaseContext) -> None:
    do_work(ctx)
    ctx.save_json("right_out", {"side": "right", "v": ctx.config["v"]})


@phase(produces="join_out", inputs=["left_out", "right_out"], config=_config("join"))
def join(ctx: PhaseContext) -> None:
    sides = [ctx.load("left_out")["side"], ctx.load("right_out")["side"]]
    do_work(ctx)
    ctx.save_json("join_out", {"sides": sides})
