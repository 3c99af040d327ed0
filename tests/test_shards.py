"""Sharded phases: one phase over many Celery tasks, merged; tests/shardapp's pipeline
numbers -> squares (sharded) -> total, through real worker subprocesses."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import pytest

from initpipeline.models import Artifact, PhaseRun, PipelineRun
from tests.conftest import Stack, wait_for

pytestmark = [pytest.mark.slow]

SHARDS = {"INITPIPELINE_TEST_PIPELINE": "shards"}
SUM = sum(n * n for n in range(40))


@pytest.fixture
def shards(stack: Stack) -> Iterator[Stack]:
    stack.env.update(SHARDS)
    yield stack


def rows(run: PipelineRun) -> dict[str, PhaseRun]:
    return {p.name: p for p in run.phases.all()}


def shard_starts(stack: Stack, run: PipelineRun) -> list[tuple[int, int, int]]:
    """(shard, first step, pid) of every start of a shard of ``run`` (tests/shardapp)."""
    path = stack.var / "shards.log"
    lines = path.read_text().splitlines() if path.exists() else []
    found = []
    for line in lines:
        run_id, index, first, pid, _ = line.split()
        if int(run_id) == run.pk:
            found.append((int(index), int(first), int(pid)))
    return found


def merged_total() -> dict[str, float]:
    from initpipeline import formats, storage
    from initpipeline.models import Generation

    record = Generation.objects.get(is_active=True).artifact_map()["total"]
    return dict(formats.read(storage.verify(record), "json"))


@pytest.mark.parametrize("stack", ["filesystem", "redis"], indirect=True)
def test_shards_run_side_by_side_on_two_worker_processes_and_merge(shards: Stack) -> None:
    shards.control(sleep={"squares": 2})
    shards.start_worker()
    shards.start_worker()
    result = shards.manage("start_init", "--wait", "--json", timeout=180)
    assert result.returncode == 0, result.stderr + shards.log(0) + shards.log(1)
    run = PipelineRun.objects.get()
    records = rows(run)
    parts = [records[f"squares#{i}"] for i in range(4)]
    assert {p.state for p in parts} == {"succeeded"}
    # Both worker processes ran shards, and two ran at the same time.
    assert len({p.worker for p in parts}) == 2
    spans = sorted((p.started_at, p.finished_at) for p in parts)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)), (
        spans
    )
    # The merge waited for every shard, and downstream saw one ordinary artifact.
    merge = records["squares"]
    assert merge.depends_on == [f"squares#{i}" for i in range(4)]
    assert merge.started_at >= max(p.finished_at for p in parts)
    assert merged_total() == {"sum": SUM, "rows": 40, "column": float(SUM)}
    assert not Artifact.objects.filter(generations__isnull=False, name__contains=".shard-")
    # init_status --json: the sharded phase carries its shards.
    data = json.loads(result.stdout)
    phase = {p["name"]: p for p in data["run"]["phases"]}["squares"]
    assert [s["index"] for s in phase["shards"]] == [0, 1, 2, 3]
    assert set(phase["shards"][0]) >= {
        "index",
        "state",
        "progress",
        "attempt",
        "worker",
        "started_at",
        "finished_at",
    }
    assert "squares#0" not in {p["name"] for p in data["run"]["phases"]}
    # Nothing changed: the next deploy has nothing to run.
    again = shards.manage("start_init")
    assert again.stdout.startswith("up to date: generation"), again.stdout + again.stderr


def test_a_worker_killed_mid_shard_costs_only_that_shard(shards: Stack) -> None:
    # Two workers: shard 1 finishes at once, shard 0 lingers (3 s after its work), so the
    # kill lands after a sibling succeeded, and a loss that re-ran every shard would show.
    shards.control(sleep={"squares": 0.2}, shards=2, shard_sleep={"0": 3})
    shards.start_worker()
    shards.start_worker()
    assert shards.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    wait_for(
        lambda: (
            rows(run)["squares#1"].state == "succeeded" and rows(run)["squares#0"].progress >= 1.0
        ),
        timeout=60,
    )
    sibling = rows(run)["squares#1"]
    victim = shards.workers[int(rows(run)["squares#0"].worker.split("@")[0].removeprefix("test"))]
    shards.control(sleep={"squares": 0.2}, shards=2)  # the next copy of shard 0 lingers not
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    run = shards.ended(run)
    assert run.state == "succeeded", run.error
    records = rows(run)
    assert (records["squares#0"].losses, records["squares#1"].losses) == (1, 0)
    # The sibling ran once, and its record was left as it was.
    assert sorted(index for index, _, _ in shard_starts(shards, run)) == [0, 0, 1]
    assert records["squares#1"].finished_at == sibling.finished_at
    assert records["squares#1"].lease == sibling.lease
    assert merged_total()["sum"] == SUM


def test_a_failing_shard_fails_the_phase_and_the_resume_runs_only_it(shards: Stack) -> None:
    # Shard 2 fails last: on two worker processes the others have succeeded by then.
    shards.control(fail_shards=[2], shard_sleep={"2": 1.5})
    shards.start_worker()
    shards.start_worker()
    result = shards.manage("start_init", "--wait")
    assert result.returncode == 1
    first = PipelineRun.objects.get()
    states = {name: p.state for name, p in rows(first).items()}
    assert states["squares#2"] == "failed"
    assert states["squares"] == "upstream_failed" and states["total"] == "upstream_failed"
    assert first.error.startswith("phase squares#2 failed: RuntimeError: shard 2 was told to fail")

    shards.control()
    result = shards.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + shards.log(0)
    second = PipelineRun.objects.latest_first().first()
    assert second is not None and second.pk != first.pk
    states = {name: p.state for name, p in rows(second).items()}
    assert states == {
        "numbers": "cached",
        "squares#0": "cached",
        "squares#1": "cached",
        "squares#2": "succeeded",
        "squares#3": "cached",
        "squares": "succeeded",
        "total": "succeeded",
    }
    assert [index for index, _, _ in shard_starts(shards, second)] == [2]
    assert merged_total()["sum"] == SUM


def test_a_merge_of_its_own_reads_the_parts_in_shard_order_in_a_worker(stack: Stack) -> None:
    # tests/mergeapp: three shards save rows (JSON) and a blob (bytes); join_rows merges them
    # with load_parts, parts and save_prepared, in the worker, and report reads the result.
    stack.env.update({"INITPIPELINE_TEST_PIPELINE": "merge"})
    worker = stack.start_worker()
    result = stack.manage("start_init", "--wait", timeout=180)
    assert result.returncode == 0, result.stderr + stack.log(0)
    run = PipelineRun.objects.get()
    records = rows(run)
    assert {records[f"rows#{i}"].state for i in range(3)} == {"succeeded"}
    assert records["rows"].state == "succeeded"
    # The merge ran once, in the worker's process, and saw each artifact's parts' format.
    merges = [line.split() for line in (stack.var / "merges.log").read_text().splitlines()]
    assert [(int(m[0]), m[2], m[3], m[4]) for m in merges] == [(run.pk, worker, "json", "bytes")]
    assert int(merges[0][1]) != os.getpid()

    from initpipeline import formats, storage
    from initpipeline.models import Generation

    served = Generation.objects.get(is_active=True).artifact_map()
    # Downstream sees what the merge wrote, not the default merge's list: the parts in
    # shard order (10 numbers over 3 shards: 3, 3, 4), and the blobs joined byte for byte.
    report = formats.read(storage.verify(served["report"]), "json")
    assert report["rows"]["sizes"] == [3, 3, 4]
    assert [r["n"] for r in report["rows"]["rows"]] == list(range(10))
    assert [r["shard"] for r in report["rows"]["rows"]] == [0] * 3 + [1] * 3 + [2] * 4
    assert report["blob"] == "".join(f"{n}\n" for n in range(10))
    assert served["blob"].format == "bytes"
    assert served["blob"].metadata == {"parts": 3}
    # No shard's part is in the generation: only what the merge published.
    assert not any(".shard-" in name for name in served)
