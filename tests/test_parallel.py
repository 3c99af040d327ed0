"""Phases with no dependency between them run side by side.

tests/parallelapp's pipeline: ``left`` and ``right`` are independent, ``join`` needs both.
The planning and the join barrier are tested against the records first, then through real
worker subprocesses on the filesystem broker and Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from initpipeline import services, storage
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun
from tests.conftest import Stack, wait_for

PARALLEL = {"INITPIPELINE_TEST_PIPELINE": "parallel"}


def records(shape: dict[str, list[str]], **states: str) -> list[PhaseRun]:
    """Unsaved phase records of a run: ``shape`` maps each phase to what it waits for."""
    return [
        PhaseRun(name=name, position=i, depends_on=deps, state=states.get(name, "pending"))
        for i, (name, deps) in enumerate(shape.items())
    ]


LINEAR = {"a": [], "b": ["a"], "c": ["b"]}
DIAMOND = {"top": [], "left": ["top"], "right": ["top"], "join": ["left", "right"]}
TWO_BRANCHES = {"x1": [], "x2": ["x1"], "y1": [], "y2": ["y1"], "end": ["x2", "y2"]}


def test_a_linear_pipeline_is_one_chain() -> None:
    assert services.plan_chains(records(LINEAR)) == [["a", "b", "c"]]
    assert services.plan_chains(records(LINEAR, a="succeeded")) == [["b", "c"]]
    assert services.plan_chains(records(LINEAR, a="cached", b="running")) == []


def test_independent_phases_start_as_separate_chains() -> None:
    assert services.plan_chains(records(TWO_BRANCHES)) == [["x1", "x2"], ["y1", "y2"]]
    assert services.plan_chains(records(DIAMOND)) == [["top"]]
    assert services.plan_chains(records(DIAMOND, top="succeeded")) == [["left"], ["right"]]
    # The join waits for both sides: with one done, it follows the other in its chain.
    assert services.plan_chains(records(DIAMOND, top="cached", left="succeeded")) == [
        ["right", "join"]
    ]
    assert services.plan_chains(records(DIAMOND, top="cached", left="running")) == [["right"]]
    done = {"top": "cached", "left": "succeeded", "right": "succeeded"}
    assert services.plan_chains(records(DIAMOND, **done)) == [["join"]]
    # A phase whose only dependency is cached starts at once.
    assert services.plan_chains(records(TWO_BRANCHES, x1="cached")) == [["x2"], ["y1", "y2"]]
    assert services.plan_chains(records(TWO_BRANCHES), start=["y1"]) == [["y1", "y2"]]


# -- the join barrier, against the records ------------------------------------------------


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What the ends of chains send to the broker, instead of sending it."""
    calls: list[Any] = []
    monkeypatch.setattr(services, "send_chain", lambda run_id, names: calls.append(names))
    monkeypatch.setattr(services, "send_finish", lambda run_id: calls.append("finish"))
    return calls


def saved_run(shape: dict[str, list[str]], **states: str) -> PipelineRun:
    now = timezone.now()
    run = PipelineRun.objects.create(state="running", started_at=now)
    for pr in records(shape, **states):
        pr.run = run
        pr.fingerprint = f"fp-{pr.name}"
        pr.max_attempts = 1
        if pr.state == "running":
            pr.attempt, pr.started_at, pr.heartbeat_at = 1, now, now
        pr.save()
    return run


def finish(run: PipelineRun, name: str) -> None:
    """The phase ``name`` succeeds as the last step of its chain."""
    pr = PhaseRun.objects.get(run=run, name=name)
    assert services._succeeded(pr, {}, 1.0, advance=True) == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_of_two_sides_the_last_to_finish_sends_the_join(sent: list[Any]) -> None:
    run = saved_run(DIAMOND, top="succeeded", left="running", right="running")
    finish(run, "left")
    assert sent == []
    finish(run, "right")
    assert sent == [["join"]]
    PhaseRun.objects.filter(run=run, name="join").update(state="running", attempt=1)
    finish(run, "join")
    assert sent == [["join"], "finish"]


@pytest.mark.django_db(transaction=True)
def test_a_failure_fails_its_dependants_and_cancels_what_has_not_started(
    sent: list[Any],
) -> None:
    run = saved_run(TWO_BRANCHES, x1="running", y1="running")
    x1 = PhaseRun.objects.get(run=run, name="x1")
    assert services._fail(x1, "RuntimeError: boom", "")
    states = dict(PhaseRun.objects.filter(run=run).values_list("name", "state"))
    assert states == {
        "x1": "failed",
        "x2": "upstream_failed",
        "end": "upstream_failed",
        # y1 runs on and keeps what it makes; y2 never starts in a failed run.
        "y1": "running",
        "y2": "cancelled",
    }
    assert PipelineRun.objects.get(pk=run.pk).state == "failed"
    finish(run, "y1")
    assert PhaseRun.objects.get(run=run, name="y1").state == "succeeded"
    assert sent == []


@pytest.mark.django_db(transaction=True)
def test_a_phase_failing_after_the_run_failed_is_not_retried(sent: list[Any]) -> None:
    run = saved_run(TWO_BRANCHES, x1="running", y1="running")
    PhaseRun.objects.filter(run=run, name="y1").update(max_attempts=3)
    assert services._fail(PhaseRun.objects.get(run=run, name="x1"), "RuntimeError: boom", "")
    y1 = PhaseRun.objects.get(run=run, name="y1")
    # y1 has attempts left, but its run is over: it fails instead of waiting for a retry
    # that would never run.
    with pytest.raises(services.PhaseFailed):
        services._failed_attempt(y1, RuntimeError("late"), "")
    y1.refresh_from_db()
    assert (y1.state, y1.error) == ("failed", "RuntimeError: late")
    run.refresh_from_db()
    assert (run.state, run.error) == ("failed", "phase x1 failed: RuntimeError: boom")
    assert sent == []


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
def test_two_independent_5_s_phases_finish_in_under_8_s(parallel: Stack) -> None:
    parallel.control(sleep={"left": 5, "right": 5})
    parallel.start_worker()
    parallel.start_worker()
    result = parallel.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + parallel.log(0) + parallel.log(1)
    run = PipelineRun.objects.get()
    phases = by_name(run)
    assert {p.state for p in phases.values()} == {"succeeded"}
    left, right, join = phases["left"], phases["right"], phases["join"]
    assert left.started_at and left.finished_at and right.started_at and right.finished_at
    # Side by side, on both worker processes ...
    assert left.started_at < right.finished_at and right.started_at < left.finished_at
    assert left.worker != right.worker
    span = max(left.finished_at, right.finished_at) - min(left.started_at, right.started_at)
    assert span < timedelta(seconds=8), span
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
