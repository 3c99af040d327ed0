"""The names of bench/serving.py's artifacts. The bench publishes them itself (a phase
that builds a 6-million-entry model would add minutes to every run of it)."""

from __future__ import annotations

from initpipeline import PhaseContext, phase


@phase(produces=["model", "slow"], version="1")
def model(ctx: PhaseContext) -> None:
    raise NotImplementedError("bench/serving.py publishes these artifacts itself")
