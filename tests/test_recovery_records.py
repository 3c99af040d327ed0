"""recovery.py against the records alone: every interleaving of two racers.

The database serialises the racers, so a race has a finite set of orders; each test plays
one order step by step. tests/test_recovery.py runs the same code in real processes.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from initpipeline import execution, recovery, services
from initpipeline.models import Generation, PhaseRun, PipelineRun
from tests.records import (
    Sent,
    ago,
    done,
    live_run,
    phase_of,
    record_artifacts,
    running,
)

pytestmark = pytest.mark.usefixtures("transactional_db")


# -- a running phase whose heartbeat stopped ----------------------------------------------


def test_stale_running_phase_is_sent_again_with_the_rest_of_its_run(sent: Sent) -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=10))
    found = recovery.recover_stale()
    assert [(f.run_id, f.phase, f.action) for f in found] == [(run.pk, "b", "resent")]
    assert sent == [(run.pk, ["b", "c"])]
    b = phase_of(run, "b")
    assert (b.state, b.attempt, b.losses, b.interrupted) == ("pending", 1, 1, True)
    assert (
        b.message == "worker w1@host lost (loss 1 of 3 allowed) during attempt 1: no heartbeat "
        "for 10 s; sent again"
    )
    assert PipelineRun.objects.get(pk=run.pk).state == "running"
    # Sent once: the phase now waits for a worker, and only an idle worker re-sends that.
    assert recovery.recover_stale() == []
    assert len(sent) == 1


def test_running_phase_with_a_fresh_heartbeat_is_left_alone(sent: Sent) -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=1))
    assert recovery.recover_stale(idle_since=ago(100)) == []
    assert sent == []
    assert phase_of(run, "b").state == "running"


def test_stale_phase_out_of_losses_fails_the_run_with_the_reason(sent: Sent) -> None:
    run = live_run(a=done(), b={**running(heartbeat_ago=10), "losses": 3})
    found = recovery.recover_stale()
    reason = (
        "worker w1@host lost (loss 4 of 3 allowed) during attempt 1: no heartbeat for 10 s; "
        "lost more often than LOST_LIMIT (3) allows"
    )
    assert [(f.phase, f.action, f.reason) for f in found] == [("b", "failed", reason)]
    assert sent == []
    states = dict(run.phases.values_list("name", "state"))
    assert states == {"a": "succeeded", "b": "failed", "c": "upstream_failed"}
    run.refresh_from_db()
    assert (run.state, run.error) == ("failed", f"phase b failed: {reason}")


def test_of_two_recoverers_that_saw_the_same_stale_phase_only_one_sends(sent: Sent) -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=10))
    seen = phase_of(run, "b")  # both read the row before either wrote
    phases = list(run.phases.order_by("position"))
    now = timezone.now()
    cutoff = now - timedelta(seconds=5)
    first = recovery._recover_running(run, seen, phases, now, cutoff)
    second = recovery._recover_running(run, seen, phases, now, cutoff)
    assert first is not None and first.action == "resent"
    assert second is None
    assert sent == [(run.pk, ["b", "c"])]


def test_recovery_backs_off_when_a_redelivered_copy_claimed_the_phase_first(sent: Sent) -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=10))
    seen = phase_of(run, "b")
    claimed = execution.claim(run.pk, "b", "task-1", "w2@host")  # Redis: same task id
    assert (claimed.attempt, claimed.lease, claimed.losses) == (1, 2, 1)
    assert claimed.message == (
        "took over: worker w1@host lost (loss 1 of 3 allowed) during attempt 1: no heartbeat "
        "for 10 s"
    )
    now = timezone.now()
    phases = list(run.phases.order_by("position"))
    assert recovery._recover_running(run, seen, phases, now, now - timedelta(seconds=5)) is None
    assert sent == []
    b = phase_of(run, "b")
    assert (b.state, b.lease, b.worker) == ("running", 2, "w2@host")


# -- a pending phase whose message is gone ------------------------------------------------


def test_pending_phase_is_sent_again_only_by_a_worker_idle_for_stale_after(sent: Sent) -> None:
    run = live_run(a=done(seconds_ago=20))
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
        run = live_run(a=done(seconds_ago=90), b={**waiting, "heartbeat_at": ago(30)})
        assert recovery.recover_stale(idle_since=ago(100)) == []  # due up to 60 s after
        PhaseRun.objects.filter(run=run, name="b").update(heartbeat_at=ago(70))
        found = recovery.recover_stale(idle_since=ago(100))
    assert [(f.phase, f.action) for f in found] == [("b", "resent")]
    assert sent == [(run.pk, ["b", "c"])]


def test_run_whose_phases_are_all_done_is_finished(sent: Sent) -> None:
    run = live_run(a=done(), b=done(), c=done())
    record_artifacts(run, "a", "b", "c")
    found = recovery.recover_stale()
    assert [(f.phase, f.action) for f in found] == [(None, "finished")]
    run.refresh_from_db()
    assert run.state == "succeeded"
    assert Generation.objects.get(is_active=True).run_id == run.pk
    assert sent == []


def test_start_recovers_a_stale_run_before_attaching_to_it(sent: Sent) -> None:
    run = live_run(a=done(), b={**running(heartbeat_ago=10), "losses": 3})
    result = services.start(trigger="test")
    # The stale run failed for good; start() began a new run instead of waiting on it.
    assert PipelineRun.objects.get(pk=run.pk).state == "failed"
    assert result.outcome == services.ENQUEUED
    assert result.run is not None and result.run.pk != run.pk


# -- the hard time limit ------------------------------------------------------------------


def hard_limit(run: PipelineRun, task_id: str = "task-1") -> None:
    from celery.exceptions import TimeLimitExceeded

    from initpipeline import signals, tasks

    # What Celery's main process sends after it killed the pool process (Celery 5.7).
    signals.on_task_failure(
        sender=tasks.run_phase, task_id=task_id, exception=TimeLimitExceeded(90), args=[run.pk, "b"]
    )


def test_phase_killed_by_the_hard_time_limit_is_sent_again_at_once(sent: Sent) -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    hard_limit(run, task_id="another task")
    assert sent == []
    hard_limit(run)
    assert sent == [(run.pk, ["b", "c"])]
    b = phase_of(run, "b")
    reason = (
        "timed out after 60 s (hard time limit 30 s later: the phase did not stop at its "
        "soft limit)"
    )
    assert (b.state, b.attempt, b.error) == ("pending", 1, reason)
    assert b.message == f"attempt 1 {reason}; sent again"


def test_phase_killed_by_the_hard_time_limit_out_of_attempts_fails(sent: Sent) -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0, attempt=3))
    hard_limit(run)
    assert sent == []
    assert phase_of(run, "b").error.startswith("timed out after 60 s (hard time limit")
    assert PipelineRun.objects.get(pk=run.pk).state == "failed"
