"""PhaseContext against the records: what a phase saves and how it says it is alive.

tests/test_recovery.py runs the same calls in real workers (heartbeat-only and silent
phases, cancels); tests/test_storage.py covers the formats and failed writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from initpipeline import loading, outcomes, services
from initpipeline.context import PhaseContext
from initpipeline.exceptions import PhaseCancelled
from initpipeline.models import Artifact, PhaseRun, PipelineRun
from initpipeline.recovery import recover_stale
from initpipeline.registry import get_pipeline
from tests.records import Sent, ago, done, live_run, phase_of, record_artifacts, running

pytestmark = pytest.mark.usefixtures("transactional_db")

STALE_AFTER = 5.0  # tests/settings.py


@pytest.fixture(autouse=True)
def fresh_cache() -> Any:
    loading.active.__init__()  # type: ignore[misc]
    loading._handles.clear()
    yield


def context(run: PipelineRun, name: str) -> PhaseContext:
    """The context a worker hands to phase ``name`` of ``run`` (its current attempt)."""
    pipeline = get_pipeline()
    return PhaseContext(phase=pipeline[name], phase_run=phase_of(run, name), pipeline=pipeline)


def test_save_bytes_publishes_exactly_the_bytes_and_readers_get_them_back(
    artifacts_dir: Path,
) -> None:
    run = live_run(a=done(), b=done(), c=running(heartbeat_ago=0))
    record_artifacts(run, "a", "b")
    data = bytes(range(256)) * 40 + b"\x00"
    ctx = context(run, "c")
    ctx.save_bytes("c_out", bytearray(data), metadata={"kind": "raw"})
    assert outcomes.record_succeeded(phase_of(run, "c"), ctx.published(), 1.0) == "succeeded"

    record = Artifact.objects.get(name="c_out")
    assert (record.format, record.size, record.metadata) == ("bytes", len(data), {"kind": "raw"})
    assert record.digest == f"blake3:{blake3(data).hexdigest()}"
    assert record.storage_key == f"c_out/blake3-{blake3(data).hexdigest()}.bin"
    assert (artifacts_dir / record.storage_key).read_bytes() == data

    assert outcomes.finish_run(run_id=run.pk) is not None
    loaded = loading.artifact("c_out").get()
    assert (type(loaded), loaded) == (bytes, data)


def test_heartbeat_keeps_a_phase_that_reports_no_progress_from_counting_as_lost(
    sent: Sent,
) -> None:
    run = live_run(a=done(), b=running(heartbeat_ago=STALE_AFTER + 1))
    ctx = context(run, "b")
    ctx.heartbeat()
    assert phase_of(run, "b").heartbeat_age(ago(0)) < STALE_AFTER
    assert recover_stale() == []
    assert sent == []
    # The same phase, had it not called heartbeat(): lost, and sent again.
    PhaseRun.objects.filter(run=run, name="b").update(heartbeat_at=ago(STALE_AFTER + 1))
    assert [(r.phase, r.action) for r in recover_stale()] == [("b", "resent")]
    assert sent == [(run.pk, ["b", "c"])]


def test_heartbeat_raises_once_the_run_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import current_app

    monkeypatch.setattr(current_app.control, "revoke", lambda ids, **kw: None)
    run = live_run(a=done(), b=running(heartbeat_ago=0))
    ctx = context(run, "b")
    ctx.heartbeat()
    assert services.cancel(run_id=run.pk) is not None
    with pytest.raises(PhaseCancelled):
        ctx.heartbeat()
    assert ctx.cancelled.is_set()
    # Nothing the stopped copy does changes the cancelled record.
    b = phase_of(run, "b")
    assert (b.state, b.message) == ("cancelled", "cancelled")
