"""execution.py against the records: claims, outcomes, the join barrier, cancel vs finish.

The database serialises racers, so each test plays one order of a race step by step;
tests/test_recovery.py and tests/test_parallel.py run the same code in real workers.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from initpipeline import execution, outcomes, services, storage
from initpipeline.context import PhaseContext
from initpipeline.exceptions import PhaseCancelled, PhaseFailed, PhaseSkipped
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun
from initpipeline.registry import get_pipeline
from tests.conftest import wait_for
from tests.records import (
    Sent,
    done,
    live_run,
    phase_of,
    record_artifacts,
    running,
    shard_parts,
    shard_success_cost,
    sharded_run,
)
from tests.test_dispatch import DIAMOND, TWO_BRANCHES, records

pytestmark = pytest.mark.usefixtures("transactional_db")


# -- claims -------------------------------------------------------------------------------


def test_redelivered_copy_with_the_same_task_id_is_skipped_while_the_heartbeat_is_fresh() -> None:
    # celery#5935: Redis hands out a task again while it runs, under the same task id.
    run = live_run(a=done(), b=running(heartbeat_ago=1, task_id="task-1"))
    with pytest.raises(PhaseSkipped, match=r"lease 1 is running in task task-1"):
        execution.claim(run.pk, "b", "task-1", "w2@host")
    b = phase_of(run, "b")
    assert (b.state, b.attempt, b.worker) == ("running", 1, "w1@host")


def test_redelivered_copy_of_a_stale_phase_out_of_losses_fails_it() -> None:
    run = live_run(a=done(), b={**running(heartbeat_ago=10), "losses": 3})
    with pytest.raises(PhaseFailed, match=r"lost more often than LOST_LIMIT \(3\) allows"):
        execution.claim(run.pk, "b", "task-1", "w2@host")
    assert phase_of(run, "b").state == "failed"
    assert PipelineRun.objects.get(pk=run.pk).state == "failed"


def test_the_copy_that_takes_over_removes_what_the_lost_one_was_writing() -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=10), c={"state": "pending"})
    b, c = phase_of(run, "b"), phase_of(run, "c")
    # A checkpoint the killed copy was writing, and a file of another phase of the run.
    left = storage.new_scratch_path(".pkl", run_id=run.pk, phase_run_id=b.pk)
    other = storage.new_scratch_path(".pkl", run_id=run.pk, phase_run_id=c.pk)
    left.write_bytes(b"half a checkpoint")
    other.write_bytes(b"being written")
    execution.claim(run.pk, "b", "task-2", "w2@host")
    assert not left.exists()
    assert other.exists()
    other.unlink()


# -- a copy that lost its phase, and cancel against finish --------------------------------


def published() -> dict[str, tuple[storage.Published, str, dict[str, Any]]]:
    return {"b_out": (storage.Published("b_out/x.npy", "1" * 64, 8), "npy", {})}


def test_copy_that_lost_its_phase_records_nothing() -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=10))
    old = phase_of(run, "b")
    execution.claim(run.pk, "b", "task-2", "w2@host")  # took over: lease 2
    with pytest.raises(PhaseSkipped, match="lease 1 no longer owns the phase"):
        outcomes.record_succeeded(old, published(), 1.0)
    assert not Artifact.objects.exists()
    b = phase_of(run, "b")
    # A loss is not an attempt: the same attempt continues under a new lease.
    assert (b.state, b.attempt, b.lease, b.losses) == ("running", 1, 2, 1)


def test_heartbeat_stops_a_copy_that_lost_its_phase() -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    pr = phase_of(run, "b")
    pipeline = get_pipeline()
    ctx = PhaseContext(phase=pipeline["b"], phase_run=pr, pipeline=pipeline)
    beat = execution.Heartbeat(pr, ctx)
    beat.start()
    try:
        # It writes the heartbeat while the copy owns the phase ...
        wait_for(lambda: phase_of(run, "b").heartbeat_at != pr.heartbeat_at, timeout=30)
        assert not ctx.cancelled.is_set()
        PhaseRun.objects.filter(pk=pr.pk).update(lease=2)  # another copy claimed it
        # ... and tells the phase to stop once it does not.
        wait_for(ctx.cancelled.is_set, timeout=30)
    finally:
        beat.stop()
    with pytest.raises(PhaseCancelled):
        ctx.progress(1, 2, "half")


def test_cancel_before_finish_never_activates(monkeypatch: pytest.MonkeyPatch) -> None:
    revoked: list[list[str]] = []
    from celery import current_app

    monkeypatch.setattr(current_app.control, "revoke", lambda ids, **kw: revoked.append(ids))
    run = live_run(a=done(), b=done(), c=running(heartbeat_ago=0, task_id="task-c"))
    assert services.cancel() is not None
    assert revoked == [["task-c"]]
    states = dict(run.phases.values_list("name", "state"))
    assert states == {"a": "succeeded", "b": "succeeded", "c": "cancelled"}
    # c finishes anyway as the cancel lands: it keeps its artifact, the run stays cancelled.
    c = PhaseRun.objects.get(run=run, name="c")
    c.state = "running"  # the copy's in-memory view, from its claim
    c_out = {"c_out": (storage.Published("c_out/x.json", "2" * 64, 3), "json", {})}
    assert outcomes.record_succeeded(c, c_out, 1.0) == "cancelled"
    assert Artifact.objects.filter(name="c_out").count() == 1
    c.refresh_from_db()
    assert (c.state, c.message) == (
        "cancelled",
        "cancelled as it finished; its artifacts are kept for the next run",
    )
    assert outcomes.finish_run(run_id=run.pk) is None
    assert not Generation.objects.exists()
    assert PipelineRun.objects.get(pk=run.pk).state == "cancelled"


def test_finish_before_cancel_leaves_nothing_to_cancel() -> None:
    run = live_run(a=done(), b=done(), c=done())
    record_artifacts(run, "a", "b", "c")
    generation = outcomes.finish_run(run_id=run.pk)
    assert generation is not None
    assert services.cancel(run_id=run.pk) is None
    run.refresh_from_db()
    assert run.state == "succeeded"
    assert Generation.objects.get(is_active=True).pk == generation.pk


# -- retries ------------------------------------------------------------------------------


@override_settings(INITPIPELINE={"RETRY_BACKOFF": 5.0, "RETRY_BACKOFF_MAX": 600.0})
def test_backoff_stays_in_the_upper_half_of_a_ceiling_that_doubles_up_to_the_max(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ceilings = [outcomes.backoff_ceiling(attempt) for attempt in range(1, 11)]
    assert ceilings == [5, 10, 20, 40, 80, 160, 320, 600, 600, 600]
    for attempt, ceiling in enumerate(ceilings, start=1):
        delays = [outcomes.backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)
        assert len(set(delays)) > 1  # jittered
    # Both ends of the range are reachable.
    for pick, share in [(min, 0.5), (max, 1.0)]:
        monkeypatch.setattr(outcomes.random, "uniform", lambda a, b, pick=pick: pick(a, b))
        assert [outcomes.backoff(n) for n in (1, 4, 12)] == [share * c for c in (5, 40, 600)]


# -- the join barrier ---------------------------------------------------------------------


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
    assert outcomes.record_succeeded(pr, {}, 1.0, advance=True) == "succeeded"


def test_of_two_sides_the_last_to_finish_sends_the_join(sent: Sent) -> None:
    run = saved_run(DIAMOND, top="succeeded", left="running", right="running")
    finish(run, "left")
    assert sent == []
    finish(run, "right")
    assert sent == [(run.pk, ["join"])]
    PhaseRun.objects.filter(run=run, name="join").update(state="running", attempt=1)
    finish(run, "join")
    assert sent == [(run.pk, ["join"]), (run.pk, ["finish"])]


def test_a_shards_success_costs_the_same_whatever_the_shard_count(sent: Sent) -> None:
    few, many = shard_success_cost(8), shard_success_cost(200)
    assert few == many, f"8 shards: {few}, 200 shards: {many} (queries, rows read)"
    assert sent == []


def test_the_last_shard_to_succeed_sends_the_merge_once(sent: Sent) -> None:
    count = 5
    run = sharded_run(count)
    for index in (3, 0, 4, 1):
        pr = PhaseRun.objects.get(run=run, name=f"squares#{index}")
        outcomes.record_succeeded(pr, shard_parts(index, count), 1.0, advance=True)
    assert sent == []
    assert PhaseRun.objects.get(run=run, name="squares").shards_done == 4
    last = PhaseRun.objects.get(run=run, name="squares#2")
    outcomes.record_succeeded(last, shard_parts(2, count), 1.0, advance=True)
    assert sent == [(run.pk, ["squares", "total"])]


def test_a_failure_fails_its_dependants_and_cancels_what_has_not_started(
    sent: Sent,
) -> None:
    run = saved_run(TWO_BRANCHES, x1="running", y1="running")
    x1 = PhaseRun.objects.get(run=run, name="x1")
    assert outcomes.fail_phase(x1, "RuntimeError: boom", "")
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


def test_a_phase_failing_after_the_run_failed_is_not_retried(sent: Sent) -> None:
    run = saved_run(TWO_BRANCHES, x1="running", y1="running")
    PhaseRun.objects.filter(run=run, name="y1").update(max_attempts=3)
    assert outcomes.fail_phase(PhaseRun.objects.get(run=run, name="x1"), "RuntimeError: boom", "")
    y1 = PhaseRun.objects.get(run=run, name="y1")
    # y1 has attempts left, but its run is over: it fails instead of waiting for a retry
    # that would never run.
    with pytest.raises(PhaseFailed):
        outcomes.record_failed_attempt(y1, RuntimeError("late"), "")
    y1.refresh_from_db()
    assert (y1.state, y1.error) == ("failed", "RuntimeError: late")
    run.refresh_from_db()
    assert (run.state, run.error) == ("failed", "phase x1 failed: RuntimeError: boom")
    assert sent == []


# -- what a phase costs in initpipeline -----------------------------------------------------


def test_a_phase_logs_where_its_time_in_initpipeline_went(
    sent: Sent, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import re

    caplog.set_level(logging.INFO, logger="initpipeline")
    run = services.start(trigger="test").run
    assert run is not None
    execution.execute_phase(run_id=run.pk, phase_name="a")
    lines = [r.getMessage() for r in caplog.records if "in initpipeline" in r.getMessage()]
    assert len(lines) == 1
    assert re.fullmatch(
        rf"phase a of run {run.pk}: [\d.]+ s of [\d.]+ s in initpipeline: "
        r"(\w+ [\d.]+ s \(\d+\), )*publish [\d.]+ s \(1\)(, \w+ [\d.]+ s \(\d+\))*; "
        r"claim [\d.]+ s, record [\d.]+ s",
        lines[0],
    ), lines[0]


def test_a_phase_runs_with_the_workers_heap_set_aside() -> None:
    import gc

    with execution.heap_set_aside():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
