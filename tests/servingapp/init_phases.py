"""The artifacts tests/servingapp's views serve. The tests publish their generations
themselves (tests/records.publish_generation): the phases only make the names known."""

from __future__ import annotations

from initpipeline import PhaseContext, phase


@phase(produces=["model", "folder"], version="1")
def model(ctx: PhaseContext) -> None:
    raise NotImplementedError("tests/test_serving.py publishes this phase's artifacts itself")
