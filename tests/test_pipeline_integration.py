"""The pipeline through real `celery worker` subprocesses, on the filesystem broker, Redis
and RabbitMQ."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from initpipeline import storage
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun
from tests.conftest import ROOT, Stack, brokers

pytestmark = [pytest.mark.slow]
BOTH = brokers("filesystem", "redis")
EVERY_BROKER = pytest.mark.parametrize("stack", ["filesystem", "redis", "rabbitmq"], indirect=True)


def states(run: PipelineRun) -> dict[str, str]:
    return dict(run.phases.order_by("position").values_list("name", "state"))


@EVERY_BROKER
def test_pipeline_runs_every_phase_and_artifacts_verify(stack: Stack) -> None:
    stack.start_worker()
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + stack.log()
    run = PipelineRun.objects.get()
    assert run.state == "succeeded"
    assert states(run) == {"a": "succeeded", "b": "succeeded", "c": "succeeded"}
    generation = Generation.objects.get(is_active=True)
    assert generation.run == run
    assert sorted(generation.artifact_map()) == ["a_out", "b_out", "c_out"]
    for record in generation.artifacts.all():
        storage.verify(record)
    assert result.stdout.splitlines()[0] == f"run {run.pk} enqueued"
    assert f"run {run.pk} succeeded in" in result.stdout

    again = stack.manage("start_init")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"up to date: generation {generation.pk} is active"
    assert PipelineRun.objects.count() == 1


@BOTH
def test_bumped_version_reruns_the_phase_and_its_downstream_only(stack: Stack) -> None:
    stack.start_worker()
    assert stack.manage("start_init", "--wait").returncode == 0
    first = Generation.objects.get(is_active=True).artifact_map()

    stack.control(versions={"b": "2"})
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + stack.log()
    run = PipelineRun.objects.latest_first().first()
    assert run is not None
    assert states(run) == {"a": "cached", "b": "succeeded", "c": "succeeded"}
    second = Generation.objects.get(is_active=True).artifact_map()
    assert second["a_out"].pk == first["a_out"].pk
    # b's version is part of its output, so it published a new file.
    assert second["b_out"].digest != first["b_out"].digest
    assert second["c_out"].pk != first["c_out"].pk
    assert "cached: a" in result.stdout

    stack.control(versions={"b": "2", "c": "7"})
    assert stack.manage("start_init", "--wait").returncode == 0
    run = PipelineRun.objects.latest_first().first()
    assert run is not None
    assert states(run) == {"a": "cached", "b": "cached", "c": "succeeded"}


@EVERY_BROKER
def test_failing_phase_fails_the_run_and_keeps_the_previous_generation(stack: Stack) -> None:
    stack.start_worker()
    assert stack.manage("start_init", "--wait").returncode == 0
    previous = Generation.objects.get(is_active=True)

    stack.control(versions={"a": "2"}, fail=["b"])
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 1
    assert "b was told to fail" in result.stderr
    run = PipelineRun.objects.latest_first().first()
    assert run is not None
    assert run.state == "failed"
    assert states(run) == {"a": "succeeded", "b": "failed", "c": "upstream_failed"}
    assert Generation.objects.get(is_active=True).pk == previous.pk

    status = stack.manage("init_status", "--json")
    assert status.returncode == 1
    data = json.loads(status.stdout)
    assert data["state"] == "failed"
    assert data["active_generation"]["id"] == previous.pk
    failed = {p["name"]: p for p in data["run"]["phases"]}["b"]
    assert failed["state"] == "failed"
    assert failed["error"].startswith("RuntimeError: b was told to fail")
    assert "Traceback (most recent call last)" in failed["error"]
    assert 'raise RuntimeError(f"{ctx.name} was told to fail")' in failed["error"]

    # Resume: a is cached, b and c run again.
    stack.control(versions={"a": "2"})
    assert stack.manage("start_init", "--wait").returncode == 0
    run = PipelineRun.objects.latest_first().first()
    assert run is not None
    assert states(run) == {"a": "cached", "b": "succeeded", "c": "succeeded"}
    assert stack.manage("init_status").returncode == 0


def test_failed_attempt_is_retried_and_recorded(stack: Stack) -> None:
    stack.start_worker()
    stack.control(fail_attempts={"c": 1})
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + stack.log()
    pr = PhaseRun.objects.get(name="c")
    assert (pr.state, pr.attempt, pr.max_attempts) == ("succeeded", 2, 3)
    assert "c fails attempt 1" in stack.log()


def test_phase_out_of_retries_fails_the_run(stack: Stack) -> None:
    stack.start_worker()
    stack.control(fail=["c"])
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 1
    pr = PhaseRun.objects.get(name="c")
    assert (pr.state, pr.attempt, pr.max_attempts) == ("failed", 3, 3)
    assert PipelineRun.objects.get().state == "failed"
    assert not Generation.objects.exists()


def test_phase_tasks_go_to_the_queue_setting(stack: Stack) -> None:
    # Every process of the deployment reads QUEUE; a worker consumes it only when told to.
    stack.env["INITPIPELINE_TEST_SETTINGS"] = json.dumps({"QUEUE": "init"})
    stack.start_worker()  # the default queue only
    dedicated = stack.start_worker(args=("-Q", "init"))
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + stack.log(1)
    run = PipelineRun.objects.get()
    assert states(run) == {"a": "succeeded", "b": "succeeded", "c": "succeeded"}
    # Both workers were ready before the run started: only the one on "init" got its tasks,
    # the finish step included.
    assert set(run.phases.values_list("worker", flat=True)) == {dedicated}
    assert "Task initpipeline.finish_run" in stack.log(1)
    assert "Task initpipeline." not in stack.log(0)


def test_ten_concurrent_start_init_create_exactly_one_run(stack: Stack) -> None:
    # No worker: the run stays in flight while all ten race to start it.
    cmd = [sys.executable, str(ROOT / "manage.py"), "start_init"]

    def call(_: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, env=stack.env, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(call, range(10)))
    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    assert PipelineRun.objects.count() == 1
    run = PipelineRun.objects.get()
    outputs = sorted(r.stdout.strip() for r in results)
    assert outputs.count(f"run {run.pk} enqueued") == 1
    assert outputs.count(f"run {run.pk} is already pending; attached to it") == 9


def test_concurrent_starts_with_other_code_never_attach_to_each_others_run(
    stack: Stack,
) -> None:
    """Two deploys' release steps at once, each with its own code: a start attaches only to
    a run planned with its own code; a run of the other code is superseded."""
    cmd = [sys.executable, str(ROOT / "manage.py"), "start_init"]
    variants = [
        {"TESTAPP_PHASE_OPTIONS": json.dumps({"b": {"version": version}})}
        for version in ("old", "new")
    ]

    def call(i: int) -> tuple[int, subprocess.CompletedProcess[str]]:
        env = {**stack.env, **variants[i % 2]}
        return i % 2, subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(call, range(10)))
    assert [r.returncode for _, r in results] == [0] * 10, [r.stderr for _, r in results]
    fingerprint = {}
    for variant, result in results:
        for line in result.stdout.splitlines():
            words = line.split()
            if "enqueued" in words or "attached" in line:
                run = PipelineRun.objects.get(pk=int(words[1]))
                b = run.phases.get(name="b").fingerprint
                fingerprint.setdefault(variant, b)
                # Attached or enqueued: always a run of this start's own code.
                assert fingerprint[variant] == b, (variant, line)
    assert fingerprint[0] != fingerprint[1]
    assert PipelineRun.objects.in_flight().count() == 1
    for run in PipelineRun.objects.exclude(pk=PipelineRun.objects.in_flight().get().pk):
        assert (run.state, run.error) == (
            "cancelled",
            "superseded: the code or settings changed since it started",
        )


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--from", "nosuch"], "CommandError: unknown phase 'nosuch' (known: a, b, c)"),
        (["--only", "a", "zz"], "CommandError: unknown phase 'zz' (known: a, b, c)"),
        # --wait changes nothing: the run never starts, so there is nothing to wait for.
        (["--wait", "--from", "nosuch"], "CommandError: unknown phase 'nosuch' (known: a, b, c)"),
        (["--wait", "--only", "zz"], "CommandError: unknown phase 'zz' (known: a, b, c)"),
    ],
)
def test_bad_usage_exits_2_with_a_one_line_reason(
    stack: Stack, args: list[str], reason: str
) -> None:
    result = stack.manage("start_init", *args)
    assert result.returncode == 2
    assert result.stderr.strip() == reason
    assert PipelineRun.objects.count() == 0


def test_demo_pipeline_through_a_worker(stack: Stack) -> None:
    demo = {"INITPIPELINE_TEST_PIPELINE": "demo", "SEARCH_MAX_DOCS": "250"}
    stack.start_worker(env=demo)
    result = stack.manage("start_init", "--wait", env=demo, timeout=300)
    assert result.returncode == 0, result.stderr + stack.log()
    run = PipelineRun.objects.get()
    assert states(run) == {
        **{f"collect_docstrings#{i}": "succeeded" for i in range(4)},  # SEARCH_SHARDS
        "collect_docstrings": "succeeded",
        "build_tfidf": "succeeded",
        "compute_lsa": "succeeded",
        "check_queries": "succeeded",
    }
    corpus = Artifact.objects.get(name="corpus")
    assert corpus.metadata["files"] == 250
    assert corpus.metadata["documents"] > 500
    docs = Artifact.objects.get(name="lsa_docs")
    assert docs.format == "npy"
    assert docs.metadata["shape"][0] == corpus.metadata["documents"]
    for record in Artifact.objects.all():
        storage.verify(record)


def test_text_a_database_cannot_store_never_hides_what_happened(stack: Stack) -> None:
    """A progress message with a file name that is not UTF-8 (Path.name gives a lone
    surrogate) runs on; an error whose text holds one, or a NUL byte, is recorded as the
    error it is, within its retries, not taken for a lost worker."""
    stack.start_worker()
    stack.control(
        sleep={"a": 0.3},
        message={"a": "parsed caf\udce9.csv"},
        fail=["c"],
        fail_text={"c": "cannot open caf\udce9.csv\x00: bad"},
    )
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 1, result.stderr + stack.log()
    a, c = PhaseRun.objects.get(name="a"), PhaseRun.objects.get(name="c")
    assert a.state == "succeeded"
    assert (c.state, c.attempt, c.losses) == ("failed", 3, 0)
    assert c.error == "RuntimeError: cannot open caf\ufffd.csv: bad"
    assert PipelineRun.objects.get().error == f"phase c failed: {c.error}"
