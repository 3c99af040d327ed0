"""Recovery, claims and cancel against the records alone: every interleaving of two racers.

The database serialises the racers, so a race has a finite set of orders; each test plays
one order step by step. tests/test_recovery.py runs the same code in real processes.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from initpipeline import recovery, services, storage
from initpipeline.context import PhaseContext
from initpipeline.exceptions import PhaseCancelled
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun
from initpipeline.registry import get_pipeline
from tests.conftest import wait_for

pytestmark = pytest.mark.usefixtures("transactional_db")

Sent = list[tuple[int, list[str]]]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    """What recovery sends to the broker, instead of sending it."""
    calls: Sent = []
    monkeypatch.setattr(services, "send_chain", lambda run_id, names: calls.append((run_id, names)))
    return calls


def ago(seconds: float) -> Any:
    return timezone.now() - timedelta(seconds=seconds)


def make_run(run_state: str = "running", **phases: dict[str, Any]) -> PipelineRun:
    """A run of the test pipeline a -> b -> c; ``phases`` override each phase's fields."""
    pipeline = get_pipeline()
    fingerprints = pipeline.fingerprints()
    run = PipelineRun.objects.create(state=run_state, started_at=ago(60), created_at=ago(60))
    for position, name in enumerate(pipeline.order()):
        fields: dict[str, Any] = {"state": "pending", "max_attempts": 3, "timeout": 60}
        fields.update(phases.get(name, {}))
        PhaseRun.objects.create(
            run=run,
            name=name,
            position=position,
            fingerprint=fingerprints[name],
            depends_on=pipeline.dependencies(name),
            **fields,
        )
    return run


def done(seconds_ago: float = 30) -> dict[str, Any]:
    return {
        "state": "succeeded",
        "attempt": 1,
        "started_at": ago(seconds_ago + 1),
        "heartbeat_at": ago(seconds_ago),
        "finished_at": ago(seconds_ago),
    }


def running(heartbeat_ago: float, attempt: int = 1, task_id: str = "task-1") -> dict[str, Any]:
    return {
        "state": "running",
        "attempt": attempt,
        "task_id": task_id,
        "worker": "w1@host",
        "started_at": ago(heartbeat_ago + 1),
        "heartbeat_at": ago(heartbeat_ago),
    }


def record_artifacts(run: PipelineRun, *names: str) -> None:
    for pr in run.phases.filter(name__in=names):
        produced = get_pipeline()[pr.name].produces[0]
        Artifact.objects.create(
            name=produced,
            fingerprint=pr.fingerprint,
            storage_key=f"{produced}/x",
            sha256="0" * 64,
            size=1,
            format="json",
            run=run,
            phase_run=pr,
        )


def phase(run: PipelineRun, name: str) -> PhaseRun:
    return PhaseRun.objects.get(run=run, name=name)


# -- a running phase whose heartbeat stopped ----------------------------------------------


def test_stale_running_phase_is_sent_again_with_the_rest_of_its_run(sent: Sent) -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=10))
    found = recovery.recover_stale()
    assert [(f.run_id, f.phase, f.action) for f in found] == [(run.pk, "b", "resent")]
    assert sent == [(run.pk, ["b", "c"])]
    b = phase(run, "b")
    assert (b.state, b.attempt) == ("pending", 1)
    assert (
        b.message == "worker w1@host lost during attempt 1 of 3: no heartbeat for 10 s; sent again"
    )
    assert PipelineRun.objects.get(pk=run.pk).state == "running"
    # Sent once: the phase now waits for a worker, and only an idle worker re-sends that.
    assert recovery.recover_stale() == []
    assert len(sent) == 1


def test_running_phase_with_a_fresh_heartbeat_is_left_alone(sent: Sent) -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=1))
    assert recovery.recover_stale(idle_since=ago(100)) == []
    assert sent == []
    assert phase(run, "b").state == "running"


def test_stale_phase_out_of_attempts_fails_the_run_with_the_reason(sent: Sent) -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=10, attempt=3))
    found = recovery.recover_stale()
    reason = "worker w1@host lost during attempt 3 of 3: no heartbeat for 10 s; no attempts left"
    assert [(f.phase, f.action, f.reason) for f in found] == [("b", "failed", reason)]
    assert sent == []
    states = dict(run.phases.values_list("name", "state"))
    assert states == {"a": "succeeded", "b": "failed", "c": "upstream_failed"}
    run.refresh_from_db()
    assert (run.state, run.error) == ("failed", f"phase b failed: {reason}")


def test_of_two_recoverers_that_saw_the_same_stale_phase_only_one_sends(sent: Sent) -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=10))
    seen = phase(run, "b")  # both read the row before either wrote
    phases = list(run.phases.order_by("position"))
    now = timezone.now()
    cutoff = now - timedelta(seconds=5)
    first = recovery._recover_running(run, seen, phases, now, cutoff)
    second = recovery._recover_running(run, seen, phases, now, cutoff)
    assert first is not None and first.action == "resent"
    assert second is None
    assert sent == [(run.pk, ["b", "c"])]


def test_recovery_backs_off_when_a_redelivered_copy_claimed_the_phase_first(sent: Sent) -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=10))
    seen = phase(run, "b")
    claimed = services._claim(run.pk, "b", "task-1", "w2@host")  # Redis: same task id
    assert claimed.attempt == 2
    assert claimed.message == (
        "attempt 2 took over: worker w1@host lost during attempt 1 of 3: no heartbeat for 10 s"
    )
    now = timezone.now()
    phases = list(run.phases.order_by("position"))
    assert recovery._recover_running(run, seen, phases, now, now - timedelta(seconds=5)) is None
    assert sent == []
    b = phase(run, "b")
    assert (b.state, b.attempt, b.worker) == ("running", 2, "w2@host")


def test_redelivered_copy_with_the_same_task_id_is_skipped_while_the_heartbeat_is_fresh() -> None:
    # celery#5935: Redis hands out a task again while it runs, under the same task id.
    run = make_run(a=done(), b=running(heartbeat_ago=1, task_id="task-1"))
    with pytest.raises(services.PhaseSkipped, match=r"attempt 1 is running in task task-1"):
        services._claim(run.pk, "b", "task-1", "w2@host")
    b = phase(run, "b")
    assert (b.state, b.attempt, b.worker) == ("running", 1, "w1@host")


def test_redelivered_copy_of_a_stale_phase_out_of_attempts_fails_it() -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=10, attempt=3))
    with pytest.raises(services.PhaseFailed, match="no attempts left"):
        services._claim(run.pk, "b", "task-1", "w2@host")
    assert phase(run, "b").state == "failed"
    assert PipelineRun.objects.get(pk=run.pk).state == "failed"


# -- a pending phase whose message is gone ------------------------------------------------


def test_pending_phase_is_sent_again_only_by_a_worker_idle_for_stale_after(sent: Sent) -> None:
    run = make_run(a=done(seconds_ago=20))
    assert recovery.recover_stale() == []  # no idle worker: the message may be queued
    assert recovery.recover_stale(idle_since=ago(2)) == []  # idle for less than STALE_AFTER
    found = recovery.recover_stale(idle_since=ago(10))
    assert [(f.phase, f.action) for f in found] == [("b", "resent")]
    assert found[0].reason.startswith("no worker took phase b for 20 s while a worker was idle")
    assert sent == [(run.pk, ["b", "c"])]
    # The re-send is a sign of life: the next look waits STALE_AFTER again.
    assert recovery.recover_stale(idle_since=ago(10)) == []
    assert len(sent) == 1


def test_retry_waiting_out_its_backoff_is_not_taken_for_lost(sent: Sent) -> None:
    waiting = {"state": "pending", "attempt": 1, "error": "RuntimeError: boom"}
    with override_settings(INITPIPELINE={"RETRY_BACKOFF": 60.0, "STALE_AFTER": 5.0}):
        run = make_run(a=done(seconds_ago=90), b={**waiting, "heartbeat_at": ago(30)})
        assert recovery.recover_stale(idle_since=ago(100)) == []  # due up to 60 s after
        PhaseRun.objects.filter(run=run, name="b").update(heartbeat_at=ago(70))
        found = recovery.recover_stale(idle_since=ago(100))
    assert [(f.phase, f.action) for f in found] == [("b", "resent")]
    assert sent == [(run.pk, ["b", "c"])]


def test_run_whose_phases_are_all_done_is_finished(sent: Sent) -> None:
    run = make_run(a=done(), b=done(), c=done())
    record_artifacts(run, "a", "b", "c")
    found = recovery.recover_stale()
    assert [(f.phase, f.action) for f in found] == [(None, "finished")]
    run.refresh_from_db()
    assert run.state == "succeeded"
    assert Generation.objects.get(is_active=True).run_id == run.pk
    assert sent == []


def test_start_recovers_a_stale_run_before_attaching_to_it(sent: Sent) -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=10, attempt=3))
    result = services.start(trigger="test")
    # The stale run failed for good; start() began a new run instead of waiting on it.
    assert PipelineRun.objects.get(pk=run.pk).state == "failed"
    assert result.outcome == services.ENQUEUED
    assert result.run is not None and result.run.pk != run.pk


# -- a copy that lost its phase, and cancel -----------------------------------------------


def published() -> dict[str, tuple[storage.Published, str, dict[str, Any]]]:
    return {"b_out": (storage.Published("b_out/x.npy", "1" * 64, 8), "npy", {})}


def test_copy_that_lost_its_phase_records_nothing() -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=10))
    old = phase(run, "b")
    services._claim(run.pk, "b", "task-2", "w2@host")  # took over: attempt 2
    with pytest.raises(services.PhaseSkipped, match="attempt 1 no longer owns the phase"):
        services._succeeded(old, published(), 1.0)
    assert not Artifact.objects.exists()
    b = phase(run, "b")
    assert (b.state, b.attempt) == ("running", 2)


def test_heartbeat_stops_a_copy_that_lost_its_phase() -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=0))
    pr = phase(run, "b")
    pipeline = get_pipeline()
    ctx = PhaseContext(phase=pipeline["b"], phase_run=pr, pipeline=pipeline)
    beat = services._Heartbeat(pr, ctx)
    beat.start()
    try:
        time.sleep(0.7)
        assert not ctx.cancelled.is_set()
        assert services.heartbeat_age(phase(run, "b"), timezone.now()) < 0.7
        PhaseRun.objects.filter(pk=pr.pk).update(attempt=2)  # another copy claimed it
        wait_for(ctx.cancelled.is_set, timeout=2)
    finally:
        beat.stop()
    with pytest.raises(PhaseCancelled):
        ctx.progress(1, 2, "half")


def test_cancel_before_finish_never_activates(monkeypatch: pytest.MonkeyPatch) -> None:
    revoked: list[list[str]] = []
    from celery import current_app

    monkeypatch.setattr(current_app.control, "revoke", revoked.append)
    run = make_run(a=done(), b=done(), c=running(heartbeat_ago=0, task_id="task-c"))
    assert services.cancel() is not None
    assert revoked == [["task-c"]]
    states = dict(run.phases.values_list("name", "state"))
    assert states == {"a": "succeeded", "b": "succeeded", "c": "cancelled"}
    # c finishes anyway as the cancel lands: it keeps its artifact, the run stays cancelled.
    c = PhaseRun.objects.get(run=run, name="c")
    c.state = "running"  # the copy's in-memory view, from its claim
    c_out = {"c_out": (storage.Published("c_out/x.json", "2" * 64, 3), "json", {})}
    assert services._succeeded(c, c_out, 1.0) == "cancelled"
    assert Artifact.objects.filter(name="c_out").count() == 1
    c.refresh_from_db()
    assert (c.state, c.message) == (
        "cancelled",
        "cancelled as it finished; its artifacts are kept for the next run",
    )
    assert services.finish_run(run_id=run.pk) is None
    assert not Generation.objects.exists()
    assert PipelineRun.objects.get(pk=run.pk).state == "cancelled"


def test_finish_before_cancel_leaves_nothing_to_cancel() -> None:
    run = make_run(a=done(), b=done(), c=done())
    record_artifacts(run, "a", "b", "c")
    generation = services.finish_run(run_id=run.pk)
    assert generation is not None
    assert services.cancel(run_id=run.pk) is None
    run.refresh_from_db()
    assert run.state == "succeeded"
    assert Generation.objects.get(is_active=True).pk == generation.pk


# -- the hard time limit ------------------------------------------------------------------


def hard_limit(run: PipelineRun, task_id: str = "task-1") -> None:
    from celery.exceptions import TimeLimitExceeded

    from initpipeline import signals, tasks

    # What Celery's main process sends after it killed the pool process (Celery 5.7).
    signals.on_task_failure(
        sender=tasks.run_phase, task_id=task_id, exception=TimeLimitExceeded(90), args=[run.pk, "b"]
    )


def test_phase_killed_by_the_hard_time_limit_is_sent_again_at_once(sent: Sent) -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=0))
    hard_limit(run, task_id="another task")
    assert sent == []
    hard_limit(run)
    assert sent == [(run.pk, ["b", "c"])]
    b = phase(run, "b")
    reason = (
        "timed out after 60 s (hard time limit 30 s later: the phase did not stop at its "
        "soft limit)"
    )
    assert (b.state, b.attempt, b.error) == ("pending", 1, reason)
    assert b.message == f"attempt 1 {reason}; sent again"


def test_phase_killed_by_the_hard_time_limit_out_of_attempts_fails(sent: Sent) -> None:
    run = make_run(a=done(), b=running(heartbeat_ago=0, attempt=3))
    hard_limit(run)
    assert sent == []
    assert phase(run, "b").error.startswith("timed out after 60 s (hard time limit")
    assert PipelineRun.objects.get(pk=run.pk).state == "failed"
