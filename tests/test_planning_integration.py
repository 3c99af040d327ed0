"""A code edit from the deploy's point of view: ``start_init --dry-run`` in a fresh process,
with no broker, then a real run through a `celery worker` subprocess (tests/codeapp)."""

from __future__ import annotations

import json
import re

import pytest

from initpipeline import formats, storage
from initpipeline.models import Generation, PipelineRun
from tests.codeapp.source import PHASES, PROJECT_REGISTRY, SCALING, edit
from tests.conftest import Stack, wait_for

pytestmark = [pytest.mark.slow]

CODE = {"INITPIPELINE_TEST_PIPELINE": "code"}
#: A broker nothing listens on: the dry run must not need one.
NO_BROKER = {**CODE, "CELERY_BROKER_URL": "redis://127.0.0.1:9/0"}


def write(stack: Stack, source: str = PHASES, scaling: str = SCALING) -> None:
    """Deploy a version of the code: the files tests/codeapp/init_phases.py loads."""
    folder = stack.var / "codeapp"
    folder.mkdir(exist_ok=True)
    (folder / "scaling.py").write_text(scaling)
    (folder / "phases.py").write_text(
        source.format(header=PROJECT_REGISTRY, scaling="codeapp_scaling")
    )


def active_value(name: str) -> object:
    record = Generation.objects.get(is_active=True).artifact_map()[name]
    return formats.read(storage.verify(record), record.format)


def test_code_edit_is_planned_before_any_worker_and_reruns_only_its_phase_and_dependants(
    stack: Stack,
) -> None:
    write(stack)
    stack.start_worker(env=CODE)
    result = stack.manage("start_init", "--wait", env=CODE)
    assert result.returncode == 0, result.stderr + stack.log()
    generation = Generation.objects.get(is_active=True)
    up_to_date = (
        "x  cached  unchanged\ny  cached  unchanged\nz  cached  unchanged\n"
        f"up to date: generation {generation.pk} is active\n"
    )

    # A comment and a docstring: nothing to run.
    commented = edit(PHASES, "# Scale each number.", "# Scale them all.")
    write(stack, edit(commented, '"""The numbers, scaled."""', '"""Scaled numbers."""'))
    plan = stack.manage("start_init", "--dry-run", env=NO_BROKER)
    assert (plan.returncode, plan.stdout) == (0, up_to_date), plan.stderr

    # y's code, without a version bump: the plan says so, before the workers have the code.
    write(stack, edit(PHASES, "scaling.scale(n) for", "scaling.scale(n) * 10 for"))
    plan = stack.manage("start_init", "--dry-run", env=NO_BROKER)
    assert (plan.returncode, plan.stdout) == (
        0,
        "x  cached  unchanged\n"
        "y  run     code changed\n"
        "z  run     input changed: y\n"
        "2 of 3 phases to run\n",
    ), plan.stderr
    plan = stack.manage("start_init", "--dry-run", "--json", env=NO_BROKER)
    assert json.loads(plan.stdout) == {
        "phases": [
            {"name": "x", "action": "cached", "reason": "unchanged"},
            {"name": "y", "action": "run", "reason": "code changed"},
            {"name": "z", "action": "run", "reason": "input changed: y"},
        ],
        "up_to_date": False,
    }
    assert PipelineRun.objects.count() == 1

    # The deploy: the workers restart with the new code, and start_init runs the plan.
    stack.stop_workers()
    stack.start_worker(env=CODE)
    result = stack.manage("start_init", "--wait", env=CODE)
    assert result.returncode == 0, result.stderr + stack.log(1)
    run = PipelineRun.objects.latest_first().first()
    assert run is not None and run.state == "succeeded"
    assert [(p.name, p.state, p.reason) for p in run.phases.order_by("position")] == [
        ("x", "cached", "unchanged"),
        ("y", "succeeded", "code changed"),
        ("z", "succeeded", "input changed: y"),
    ]
    assert active_value("y_out") == [0, 20, 40, 60]
    assert active_value("z_out") == {"total": 120}
    assert "another fingerprint" not in stack.log(1)

    status = stack.manage("init_status", env=CODE)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()[2:6]
    patterns = [
        "PHASE  STATE      REASON            PROGRESS  ATTEMPT  LOST  DURATION  MESSAGE",
        "x      cached     unchanged         100%      0/1      0/3   -",
        r"y      succeeded  code changed      100%      1/1      0/3   \d+\.\d s",
        r"z      succeeded  input changed: y  100%      1/1      0/3   \d+\.\d s",
    ]
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} !~ {pattern!r}"
    status = stack.manage("init_status", "--json", env=CODE)
    phases = json.loads(status.stdout)["run"]["phases"]
    assert [p["reason"] for p in phases] == ["unchanged", "code changed", "input changed: y"]


def test_an_old_worker_hands_a_phase_of_edited_code_back_and_both_fingerprints_show(
    stack: Stack,
) -> None:
    """A real code edit, deployed while a worker with the old code is still up."""
    from initpipeline.models import Artifact, PhaseRun

    write(stack)
    stack.start_worker(env=CODE)
    assert stack.manage("start_init", "--wait", env=CODE).returncode == 0, stack.log()
    first = PipelineRun.objects.get()
    old_y = PhaseRun.objects.get(run=first, name="y").fingerprint

    write(stack, edit(PHASES, "scaling.scale(n) for", "scaling.scale(n) * 10 for"))
    assert stack.manage("start_init", env=CODE).returncode == 0
    run = PipelineRun.objects.latest_first().first()
    assert run is not None and run.pk != first.pk
    planned = PhaseRun.objects.get(run=run, name="y").fingerprint
    assert planned != old_y

    def waiting() -> str:
        message = PhaseRun.objects.get(run=run, name="y").message
        return message if "waiting for a worker running the planned code" in message else ""

    message = wait_for(waiting, timeout=60)
    # Both fingerprints: what the run planned, and what the old worker's code gives.
    assert f"planned fingerprint {planned[:12]}…, this worker's {old_y[:12]}…" in message
    assert not Artifact.objects.filter(name="y_out", fingerprint=planned).exists()
    stack.start_worker(env=CODE)  # the deploy's new worker, with the edited code
    run = stack.ended(run)
    assert run.state == "succeeded", run.error
    assert Artifact.objects.get(name="y_out", fingerprint=planned).phase_run.worker.startswith(
        "test1@"
    )
