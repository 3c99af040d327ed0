"""checkpoints.py: a phase's resumable state, kept like an artifact, found by the next attempt."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from initpipeline import checkpoints, execution, outcomes, services, storage
from initpipeline.context import PhaseContext
from initpipeline.exceptions import PhaseCancelled, PhaseHandedOff
from initpipeline.models import PhaseRun, PipelineRun
from initpipeline.registry import get_pipeline
from tests.records import Sent, done, live_run, phase_of, running

pytestmark = pytest.mark.usefixtures("transactional_db")


def context(run: PipelineRun, name: str) -> PhaseContext:
    pipeline = get_pipeline()
    return PhaseContext(phase=pipeline[name], phase_run=phase_of(run, name), pipeline=pipeline)


def test_a_state_round_trips_as_json_or_as_a_signed_pickle() -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    ctx = context(run, "b")
    ctx.checkpoint({"done": 3, "parts": [1, 2, 3]}, done=3, total=10)
    saved = phase_of(run, "b").checkpoint
    assert (saved["format"], saved["done"], saved["total"]) == ("json", 3, 10)
    assert checkpoints.load(saved) == {"done": 3, "parts": [1, 2, 3]}
    # A tuple would come back from JSON as a list: that state is pickled (and signed).
    ctx.checkpoint({"done": 4, "seen": (1, 2)})
    saved = phase_of(run, "b").checkpoint
    assert saved["format"] == "pickle"
    assert checkpoints.load(saved) == {"done": 4, "seen": (1, 2)}


def test_the_next_attempt_resumes_from_the_latest_checkpoint(sent: Sent) -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    first = context(run, "b")
    first.checkpoint({"step": 1})
    older = phase_of(run, "b").checkpoint["key"]
    first.checkpoint({"step": 2}, done=2, total=5)
    # The worker is lost; the claim of the next copy continues the same attempt.
    PhaseRun.objects.filter(run=run, name="b").update(
        heartbeat_at=timezone.now() - timedelta(seconds=60)
    )
    pr = execution.claim(run.pk, "b", "task-2", "w2@host")
    assert (pr.attempt, pr.lease, pr.losses) == (1, 2, 1)
    assert (pr.progress_done, pr.progress_total) == (2, 5)  # the bar resumes where it was
    assert "resumed from its checkpoint at 40%" in pr.message
    again = context(run, "b")
    assert again.resumed == {"step": 2}
    assert again.resumed_progress == (2.0, 5)
    # The first checkpoint's object was deleted when the second replaced it.
    assert not storage.get_storage().exists(older)


def test_a_copy_that_lost_the_phase_cannot_checkpoint() -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    ctx = context(run, "b")
    PhaseRun.objects.filter(run=run, name="b").update(lease=2)  # another copy claimed it
    with pytest.raises(PhaseCancelled):
        ctx.checkpoint({"step": 9})
    assert phase_of(run, "b").checkpoint is None


def test_a_hand_off_saves_the_state_then_raises() -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    ctx = context(run, "b")
    PhaseRun.objects.filter(run=run, name="b").update(handoff_requested_at=timezone.now())
    with pytest.raises(PhaseHandedOff):
        ctx.progress(7, 10, "step 7", checkpoint=lambda: {"step": 7})
    assert ctx.stopping
    assert checkpoints.load(phase_of(run, "b").checkpoint) == {"step": 7}
    assert outcomes.record_handed_off(phase_of(run, "b"), "handed back") == "handed_off"
    b = phase_of(run, "b")
    assert (b.state, b.handoffs, b.interrupted, b.attempt) == ("pending", 1, True, 1)


def test_a_new_run_resumes_what_a_failed_run_left(sent: Sent) -> None:
    old = live_run(run_state="failed", a=done(), b={"state": "failed", "attempt": 1})
    record = {"key": "x", "digest": "blake3:" + "0" * 64, "size": 1, "format": "json", "done": 4}
    PhaseRun.objects.filter(run=old, name="b").update(checkpoint=record)
    rows = [PhaseRun(name="b", fingerprint=phase_of(old, "b").fingerprint)]
    checkpoints.adopt(rows)
    assert rows[0].checkpoint == record
    assert rows[0].message == f"will resume from the checkpoint run {old.pk} left"


def test_success_drops_the_checkpoints_of_the_phase() -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    context(run, "b").checkpoint({"step": 3})
    key = phase_of(run, "b").checkpoint["key"]
    checkpoints.drop(name="b", fingerprint=phase_of(run, "b").fingerprint)
    assert phase_of(run, "b").checkpoint is None
    assert not storage.get_storage().exists(key)


def test_init_gc_deletes_checkpoints_nothing_points_at(artifacts_dir: Path) -> None:
    path = storage.new_scratch_path(".json")
    path.write_bytes(b'{"orphan": true}')
    pub = storage.publish(path, name=checkpoints.FOLDER, suffix=".json")
    assert checkpoints.collect() == []  # too young: it may be on its way to its record
    old = timezone.now().timestamp() - 2 * checkpoints.GRACE_SECONDS
    target = artifacts_dir / pub.key
    os.utime(target, (old, old))
    assert checkpoints.collect() == [pub.key]
    assert not target.exists()


def test_a_run_planned_with_other_code_makes_way(sent: Sent) -> None:
    old = live_run(a=done(), b=running(heartbeat_ago=0))
    PhaseRun.objects.filter(run=old, name="b").update(fingerprint="f" * 64)
    result = services.start(trigger="deploy")
    assert result.outcome == services.ENQUEUED
    assert result.superseded is not None and result.superseded.pk == old.pk
    old.refresh_from_db()
    assert (old.state, old.error) == (
        "cancelled",
        "superseded: the code or settings changed since it started",
    )
    assert result.run is not None and result.run.pk != old.pk


class Acc:
    """A phase's accumulator, pickled in its checkpoint (the class is renamed below)."""

    def __init__(self, total: int) -> None:
        self.total = total


def test_a_checkpoint_that_cannot_be_unpickled_is_discarded_not_failed_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    context(run, "b").checkpoint({"done": 5, "acc": Acc(41)}, done=5, total=10)
    saved = phase_of(run, "b").checkpoint
    assert saved["format"] == "pickle"
    # The helper class was renamed since (the phase's own code, and fingerprint, did not change).
    monkeypatch.delitem(globals(), "Acc")
    assert checkpoints.load(saved) is None
    assert "cannot be read back (AttributeError" in caplog.text
    # Discarded: no row points at it, its file is gone, and the next run does not adopt it.
    assert phase_of(run, "b").checkpoint is None
    assert not storage.get_storage().exists(saved["key"])


def test_a_tampered_checkpoint_pickle_never_loads_and_is_discarded() -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    context(run, "b").checkpoint({"done": 5, "seen": (1, 2)}, done=5, total=10)
    saved = phase_of(run, "b").checkpoint
    assert saved["format"] == "pickle"
    path = storage.verify(checkpoints._artifact(saved))
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a byte of the pickled state, after the signature
    path.write_bytes(bytes(data))
    assert checkpoints.load(saved) is None
    assert phase_of(run, "b").checkpoint is None


def test_a_checkpoint_of_tens_of_megabytes_round_trips() -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    state = {"done": 7, "blob": os.urandom(24 * 1024 * 1024), "rows": list(range(200_000))}
    context(run, "b").checkpoint(state, done=7, total=10)
    saved = phase_of(run, "b").checkpoint
    assert saved["size"] > 24 * 1024 * 1024
    assert checkpoints.load(saved) == state
