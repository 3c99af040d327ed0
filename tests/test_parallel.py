"""Phases with no dependency between them run side by side.

tests/parallelapp's pipeline: ``left`` and ``right`` are independent, ``join`` needs both.
Planning is tested in tests/test_dispatch.py and the join barrier against the records in
tests/test_execution.py; here it runs through real worker subprocesses on the filesystem
broker and Redis.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from initpipeline import storage
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun
from tests.conftest import Stack, wait_for

PARALLEL = {"INITPIPELINE_TEST_PIPELINE": "parallel"}


# -- through real workers -----------------------------------------------------------------


def by_name(run: PipelineRun) -> dict[str, PhaseRun]:
    return {p.name: p for p in run.phases.all()}


@pytest.fixture
def parallel(stack: Stack) -> Iterator[Stack]:
    """The stack, on the parallel pipeline, with two worker processes."""
    stack.env.update(PARALLEL)
    yield stack


BOTH = pytest.mark.parametrize("stack", ["filesystem", "redis"], indirect=True)


@pytest.mark.slow
@BOTH
def test_two_independent_phases_run_side_by_side_on_two_workers(parallel: Stack) -> None:
    parallel.control(sleep={"left": 3, "right": 3})
    parallel.start_worker()
    parallel.start_worker()
    result = parallel.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + parallel.log(0) + parallel.log(1)
    run = PipelineRun.objects.get()
    phases = by_name(run)
    assert {p.state for p in phases.values()} == {"succeeded"}
    left, right, join = phases["left"], phases["right"], phases["join"]
    assert left.started_at and left.finished_at and right.started_at and right.finished_at
    # Side by side, on both worker processes: each started before the other finished ...
    assert left.started_at < right.finished_at and right.started_at < left.finished_at
    assert left.worker != right.worker
    # ... which their progress() calls show too: each called while the other was calling.
    calls = parallel.calls(run.pk)
    sides = [c.phase for c in calls if c.phase in ("left", "right")]
    switches = sum(1 for x, y in itertools.pairwise(sides) if x != y)
    assert switches > 2, sides
    # ... and the join only after both.
    assert join.started_at is not None
    assert join.started_at >= max(left.finished_at, right.finished_at)
    generation = Generation.objects.get(is_active=True)
    assert generation.run == run
    assert sorted(generation.artifact_map()) == ["join_out", "left_out", "right_out"]


@pytest.mark.slow
@BOTH
def test_a_failing_branch_fails_its_dependants_and_the_other_keeps_its_artifacts(
    parallel: Stack,
) -> None:
    parallel.control(sleep={"left": 0.5, "right": 4}, fail=["left"])
    parallel.start_worker()
    parallel.start_worker()
    result = parallel.manage("start_init", "--wait")
    assert result.returncode == 1
    assert "left was told to fail" in result.stderr
    run = PipelineRun.objects.get()
    assert run.state == "failed"
    # The run failed while right still ran: right finishes and records its artifact.
    wait_for(lambda: PhaseRun.objects.get(run=run, name="right").state == "succeeded", 30)
    phases = by_name(run)
    assert {n: p.state for n, p in phases.items()} == {
        "left": "failed",
        "right": "succeeded",
        "join": "upstream_failed",
    }
    kept = Artifact.objects.get(name="right_out")
    storage.verify(kept)
    assert not Artifact.objects.filter(name__in=["left_out", "join_out"]).exists()

    # The next run finds right's artifact cached and runs only what failed.
    parallel.control()
    assert parallel.manage("start_init", "--wait").returncode == 0
    latest = PipelineRun.objects.latest_first().first()
    assert latest is not None
    assert {n: p.state for n, p in by_name(latest).items()} == {
        "left": "succeeded",
        "right": "cached",
        "join": "succeeded",
    }
