"""Hour-long phases lose nothing: a lost worker is not a failure, a checkpoint is resumed, a
worker shutting down hands its phase back, and a worker with other code never publishes
under the planned fingerprint. Real worker subprocesses, on the filesystem broker and Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from initpipeline.models import Artifact, PhaseRun, PipelineRun
from tests.conftest import ROOT, Stack, brokers, wait_for
from tests.servers import celery_worker, kill_group, spawn

pytestmark = [pytest.mark.slow]

# The filesystem broker and Redis, and the CI leg's own (INITPIPELINE_TEST_BROKER=rabbitmq).
BOTH = brokers("filesystem", "redis")
STALE_AFTER = 5.0  # tests/settings.py


def phase(run: PipelineRun, name: str) -> PhaseRun:
    return PhaseRun.objects.get(run=run, name=name)


def starts(stack: Stack, run: PipelineRun, name: str) -> list[int]:
    """The step each start of phase ``name`` of ``run`` began at (tests/testapp/work.py)."""
    path = stack.var / "starts.log"
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [int(r[2]) for r in rows if r[0] == name and int(r[1]) == run.pk]


def kill(stack: Stack, n: int = 0) -> None:
    """SIGKILL worker ``n`` and its pool processes: no code of ours runs at all."""
    proc = stack.workers[n]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@BOTH
def test_a_worker_killed_mid_phase_is_a_loss_and_the_run_completes_by_itself(
    stack: Stack,
) -> None:
    # b has no retries (the default): before, a lost worker failed the run.
    stack.control(sleep={"b": 3})
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    wait_for(lambda: phase(run, "b").progress >= 0.2, timeout=60)
    kill(stack)
    stack.start_worker()  # nobody types a command
    run = stack.ended(run)
    assert run.state == "succeeded", run.error
    b = phase(run, "b")
    assert (b.attempt, b.max_attempts, b.losses, b.handoffs) == (1, 1, 1, 0)
    assert starts(stack, run, "b") == [0, 0]  # no checkpoint: it started over


@BOTH
def test_a_worker_killed_after_a_checkpoint_resumes_from_it(stack: Stack) -> None:
    # 50 steps of 0.2 s, a checkpoint every 10: a kill lands within a step of its aim.
    stack.control(sleep={"b": 10}, checkpoint={"b": 10})
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()

    def late_in_an_interval() -> int:
        # Six steps of ten past a checkpoint (and well before the end): the kill costs
        # those six or so, not one.
        b = phase(run, "b")
        saved = int((b.checkpoint or {}).get("done") or 0)
        return saved if 20 <= saved <= 30 and b.progress_done >= saved + 6 else 0

    wait_for(late_in_an_interval, timeout=60, interval=0.02)
    killed_at = datetime.now(UTC)
    kill(stack)
    # The last step the killed copy did, from its own trace (what a kill really cost).
    lost_at = max(c.step for c in stack.calls(run.pk) if c.phase == "b" and c.at < killed_at)
    saved = int(phase(run, "b").checkpoint["done"])
    stack.start_worker()
    run = stack.ended(run)
    assert run.state == "succeeded", run.error
    first, again = starts(stack, run, "b")
    assert first == 0
    # It resumed from the latest checkpoint before the kill, and redid what followed it:
    # the steps since that checkpoint, never more than an interval.
    assert again == saved
    assert 6 <= lost_at - again < 10
    b = phase(run, "b")
    assert (b.attempt, b.losses) == (1, 1)
    # A phase that succeeds drops its checkpoints.
    assert b.checkpoint is None


@BOTH
def test_sigterm_hands_the_phase_to_another_worker_from_its_checkpoint(stack: Stack) -> None:
    stack.control(sleep={"b": 60}, checkpoint={"b": 50})  # 600 steps: a minute
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    wait_for(lambda: phase(run, "b").progress_done >= 60, timeout=60, interval=0.05)
    leaving = stack.workers[0]
    os.kill(leaving.pid, signal.SIGTERM)  # a warm shutdown, as systemd or Kubernetes do
    # The worker does not wait out the phase's remaining 50 s: it hands it back and exits.
    try:
        leaving.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(stack.log(0)) from None
    b = phase(run, "b")
    assert (b.state, b.handoffs) == ("pending", 1), stack.log(0)
    assert b.message.startswith("handed back by its worker, which is shutting down")
    # Handing off is neither an attempt nor a loss.
    assert (b.attempt, b.losses) == (1, 0)
    handed_at = int(b.checkpoint["done"])
    # The state at the hand-off itself (the step of the phase's last progress() call, from
    # its own trace), not the last periodic one.
    last = max(c.step for c in stack.calls(run.pk) if c.phase == "b" and c.kind == "progress")
    assert handed_at == last, (handed_at, last)
    stack.control(sleep={"b": 6}, checkpoint={"b": 50})  # finish quicker on the next worker
    stack.start_worker()
    run = stack.ended(run)
    assert run.state == "succeeded", run.error + stack.log(1)
    assert starts(stack, run, "b") == [0, handed_at]
    b = phase(run, "b")
    assert (b.handoffs, b.attempt, b.losses) == (1, 1, 0)


def test_sigterm_takes_back_a_phase_that_does_not_hand_itself_back(stack: Stack) -> None:
    # No progress() calls: the phase never sees the request, so the worker takes the
    # phase back after HANDOFF_GRACE (2 s in the tests), stops its pool process and exits.
    stack.control(sleep={"b": 60}, quiet=["b"])
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    wait_for(lambda: phase(run, "b").state == "running", timeout=60)
    leaving = stack.workers[0]
    os.kill(leaving.pid, signal.SIGTERM)
    try:
        leaving.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(stack.log(0)) from None
    b = phase(run, "b")
    assert (b.state, b.handoffs, b.losses) == ("pending", 1, 0), b.message
    assert "did not hand itself back within 2 s" in b.message


def test_a_worker_running_other_code_never_publishes_under_the_plan(stack: Stack) -> None:
    # The release step plans with the new code while a worker with the old code is up.
    old = {"TESTAPP_PHASE_OPTIONS": json.dumps({"b": {"version": "old"}})}
    stack.start_worker(env=old)
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    planned = phase(run, "b").fingerprint

    def waiting() -> bool:
        return "waiting for a worker running the planned code" in phase(run, "b").message

    wait_for(waiting, timeout=60)
    message = phase(run, "b").message
    assert f"planned fingerprint {planned[:12]}…" in message
    assert phase(run, "a").state == "succeeded"  # a's code is the same: the old worker ran it
    assert not Artifact.objects.filter(name="b_out").exists()
    stack.start_worker()  # the new code's worker
    run = stack.ended(run)
    assert run.state == "succeeded", run.error
    b_out = Artifact.objects.get(name="b_out")
    assert b_out.fingerprint == planned
    # b ran once, in the new worker.
    assert len(starts(stack, run, "b")) == 1
    assert b_out.phase_run is not None and b_out.phase_run.worker.startswith("test1@")


def test_no_worker_with_the_planned_code_fails_the_run_after_skew_timeout(stack: Stack) -> None:
    stack.env["INITPIPELINE_TEST_SKEW_TIMEOUT"] = "3"
    stack.start_worker(env={"TESTAPP_PHASE_OPTIONS": json.dumps({"b": {"version": "old"}})})
    assert stack.manage("start_init").returncode == 0
    run = stack.ended(PipelineRun.objects.get(), timeout=60)
    assert run.state == "failed"
    assert run.error.startswith(
        "phase b failed: no worker ran the planned code within SKEW_TIMEOUT (3 s): waiting for "
        "a worker running the planned code"
    )
    assert not Artifact.objects.filter(name="b_out").exists()


def test_past_lost_limit_the_run_fails_with_the_reason(stack: Stack) -> None:
    stack.env["INITPIPELINE_TEST_LOST_LIMIT"] = "1"
    stack.control(sleep={"b": 30})
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    for loss in (1, 2):
        wait_for(lambda: phase(run, "b").state == "running", timeout=60)
        kill(stack, len(stack.workers) - 1)
        stack.start_worker()
        if loss == 1:
            wait_for(lambda: phase(run, "b").losses == 1, timeout=6 * STALE_AFTER)
    run = stack.ended(run)
    assert run.state == "failed"
    assert "lost more often than LOST_LIMIT (1) allows" in run.error
    assert phase(run, "b").losses == 1


def test_sigterm_to_the_whole_process_group_still_hands_the_phase_back(stack: Stack) -> None:
    """honcho (make demo's Ctrl-C), foreman and supervisord's stopasgroup signal the whole
    process group: the pool processes must not die beside the main process."""
    stack.control(sleep={"b": 60}, checkpoint={"b": 50})
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    wait_for(lambda: phase(run, "b").progress_done >= 60, timeout=60, interval=0.05)
    leaving = stack.workers[0]
    os.killpg(leaving.pid, signal.SIGTERM)
    try:
        leaving.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(stack.log(0)) from None
    b = phase(run, "b")
    assert (b.state, b.handoffs, b.losses) == ("pending", 1, 0), stack.log(0)
    assert b.message.startswith("handed back by its worker, which is shutting down")
    assert int(b.checkpoint["done"]) >= 60


def test_a_worker_started_under_a_gone_workers_name_takes_its_phases_back_at_once(
    stack: Stack,
) -> None:
    # Recovery by heartbeat would wait two minutes: only the new rule can act in time.
    stack.env["INITPIPELINE_TEST_SETTINGS"] = json.dumps({"STALE_AFTER": 120})
    stack.control(sleep={"b": 60}, checkpoint={"b": 50})
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    wait_for(lambda: phase(run, "b").progress_done >= 60, timeout=60, interval=0.05)
    kill(stack)  # the worker and its pool, as a reboot or an OOM kill of the group would
    stack.control(sleep={"b": 2}, checkpoint={"b": 5})
    stack.start_worker(args=("-n", "test0@%h"))  # the same node name again
    run = stack.ended(run, timeout=60)
    assert run.state == "succeeded", run.error + stack.log(1)
    b = phase(run, "b")
    assert (b.attempt, b.losses) == (1, 1)
    assert "is gone: a worker started under its name" in stack.log(1)


def test_another_worker_of_the_same_name_shutting_down_does_not_stop_ours(
    stack: Stack,
) -> None:
    """Two workers of one name on a host (another project, a second one started without
    -n): one's shutdown mark must not make the other leave every phase it gets."""
    if stack.broker == "rabbitmq":
        pytest.skip(
            "RabbitMQ refuses a second worker of one node name (its pidbox queue is exclusive)"
        )
    stack.start_worker()
    stack.start_worker(args=("-n", "test0@%h"))
    other = stack.workers[1]
    os.kill(other.pid, signal.SIGTERM)
    other.wait(timeout=30)
    result = stack.manage("start_init", "--wait", timeout=120)
    assert result.returncode == 0, result.stderr + stack.log(0)
    assert "is shutting down" not in stack.log(0)
    assert {p.state for p in PhaseRun.objects.all()} == {"succeeded"}


def test_ctrl_c_under_make_demo_hands_the_running_phase_back(stack: Stack) -> None:
    """make demo runs honcho (project/run.py): Ctrl-C makes it SIGTERM the worker's process
    group and SIGKILL what is left later. The phase is handed back, nothing is killed."""
    procfile = stack.tmp / "Procfile"
    worker = " ".join(celery_worker("-n", "test0@%h"))
    procfile.write_text(f"worker: exec {worker}\n")
    stack.control(sleep={"b": 60}, checkpoint={"b": 50})
    assert stack.manage("start_init").returncode == 0
    log = stack.tmp / "honcho.log"
    honcho = spawn(
        [sys.executable, "-m", "project.run", "start", "-f", str(procfile), "worker"],
        {**stack.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        log,
        cwd=ROOT,
    )
    try:
        run = PipelineRun.objects.get()
        wait_for(lambda: phase(run, "b").progress_done >= 60, timeout=60, interval=0.05, log=log)
        os.kill(honcho.pid, signal.SIGINT)  # what the terminal sends honcho on Ctrl-C
        honcho.wait(timeout=60)
    finally:
        kill_group(honcho)
    text = log.read_text(errors="replace")
    assert "sending SIGKILL" not in text, text
    b = phase(run, "b")
    assert (b.state, b.handoffs, b.losses) == ("pending", 1, 0), text
    assert int(b.checkpoint["done"]) >= 60


def test_a_superseded_run_leaves_its_finished_phases_and_checkpoints_to_the_next(
    stack: Stack,
) -> None:
    """A deploy with other settings while a run is in flight: the run makes way, and the
    new one keeps what it finished (cached) and resumes its checkpoints."""
    stack.control(sleep={"b": 60}, checkpoint={"b": 50})
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    first = PipelineRun.objects.get()
    wait_for(lambda: phase(first, "b").progress_done >= 60, timeout=60, interval=0.05)
    # c's config changes (its fingerprint with it); a and b stay as they were. The new run's
    # b is held once its work is done, so that its checkpoint is still there to be read.
    stack.control(sleep={"b": 6}, checkpoint={"b": 50}, versions={"c": "2"}, hold=["b"])
    result = stack.manage("start_init")
    assert result.returncode == 0, result.stderr
    second = PipelineRun.objects.latest_first().first()
    assert second is not None and second.pk != first.pk
    assert result.stdout.splitlines() == [
        f"run {first.pk} cancelled: superseded: the code or settings changed since it started",
        f"run {second.pk} enqueued",
    ]
    first.refresh_from_db()
    assert first.state == "cancelled"
    # The new run's b adopted the checkpoint the superseded one left.
    resumed_from = int(phase(second, "b").checkpoint["done"])
    assert resumed_from >= 50
    stack.control(sleep={"b": 6}, checkpoint={"b": 50}, versions={"c": "2"})
    second = stack.ended(second)
    assert second.state == "succeeded", second.error
    assert phase(second, "a").state == "cached"  # finished in the superseded run
    assert starts(stack, second, "b") == [resumed_from]

    # And --json names the run it superseded.
    stack.control(sleep={"b": 60}, checkpoint={"b": 50}, versions={"c": "3"})
    assert stack.manage("start_init", "--force").returncode == 0
    third = PipelineRun.objects.latest_first().first()
    assert third is not None
    stack.control(sleep={"b": 60}, checkpoint={"b": 50}, versions={"c": "4"})
    result = stack.manage("start_init", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["superseded"] == third.pk
