"""start_init and init_status output through a real worker: plain lines, a terminal, NO_COLOR."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from initpipeline import digests
from initpipeline.formatters import fmt_size
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun
from tests.conftest import ROOT, Stack, free_port, wait_for
from tests.servers import SilentServer

pytestmark = [pytest.mark.slow]

CLOCK = r"\d\d:\d\d:\d\d"
DURATION = r"(\d+\.\d s|\d+m\d\ds)"
# Progress lines depend on when the poll happens to look: they may or may not be there.
PROGRESS = re.compile(rf"{CLOCK} [abc] \d+% (step \d+ of \d+|held: step \d+)")


def events(stdout: str) -> list[str]:
    """The output without progress lines."""
    return [line for line in stdout.splitlines() if not PROGRESS.fullmatch(line)]


def assert_lines(actual: list[str], patterns: list[str]) -> None:
    assert len(actual) == len(patterns), "\n".join(actual)
    for line, pattern in zip(actual, patterns, strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} !~ {pattern!r}\n" + "\n".join(actual)


def artifact_patterns(generation: Generation, run: PipelineRun) -> list[str]:
    records = sorted(generation.artifacts.all(), key=lambda a: a.name)
    width = max(len(fmt_size(a.size)) for a in records)
    fmt_width = max(len(a.format) for a in records)
    lines = []
    for a in records:
        origin = f"  from run {a.run_id}" if a.run_id != run.pk else ""
        lines.append(
            re.escape(
                f"  {a.name}  {a.format.ljust(fmt_width)}  {fmt_size(a.size).ljust(width)}  "
                f"{digests.short(a.digest)}{origin}"
            )
        )
    return lines


def test_start_init_wait_prints_exact_lines_and_a_summary(stack: Stack) -> None:
    stack.start_worker()
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + stack.log()
    run = PipelineRun.objects.get()
    generation = Generation.objects.get(run=run)
    assert_lines(
        events(result.stdout),
        [
            f"run {run.pk} enqueued",
            f"{CLOCK} a running",
            f"{CLOCK} a succeeded in {DURATION}",
            f"{CLOCK} b running",
            f"{CLOCK} b succeeded in {DURATION}",
            f"{CLOCK} c running",
            f"{CLOCK} c succeeded in {DURATION}",
            f"run {run.pk} succeeded in {DURATION}",
            f"  a  succeeded  {DURATION}",
            f"  b  succeeded  {DURATION}",
            f"  c  succeeded  {DURATION}",
            re.escape(f"artifacts of generation {generation.pk} (active):"),
            *artifact_patterns(generation, run),
        ],
    )

    # b's new version: a is cached, and its artifact comes from the first run.
    stack.control(versions={"b": "2"})
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + stack.log()
    second = PipelineRun.objects.latest_first().first()
    assert second is not None
    generation = Generation.objects.get(run=second)
    patterns = artifact_patterns(generation, second)
    assert patterns[0].endswith(re.escape(f"  from run {run.pk}"))
    assert_lines(
        events(result.stdout),
        [
            f"run {second.pk} enqueued",
            f"{CLOCK} a cached",
            f"{CLOCK} b running",
            f"{CLOCK} b succeeded in {DURATION}",
            f"{CLOCK} c running",
            f"{CLOCK} c succeeded in {DURATION}",
            f"run {second.pk} succeeded in {DURATION}",
            r"  a  cached     -",
            f"  b  succeeded  {DURATION}",
            f"  c  succeeded  {DURATION}",
            "cached: a",
            re.escape(f"artifacts of generation {generation.pk} (active):"),
            *patterns,
        ],
    )


def test_failed_run_and_init_status_watch(stack: Stack) -> None:
    stack.start_worker()
    # No --wait: init_status --watch follows the run instead.
    stack.control(fail=["b"], sleep={"a": 4})
    result = stack.manage("start_init")
    assert result.returncode == 0, result.stderr
    run = PipelineRun.objects.get()
    wait_for(lambda: run.phases.filter(state="running").exists(), timeout=60)
    watch = stack.manage("init_status", "--watch")
    assert watch.returncode == 1, watch.stderr + stack.log()  # the latest run failed
    published = Artifact.objects.get(run=run)
    lines = events(watch.stdout)
    assert_lines(
        lines,
        [
            f"watching run {run.pk}",
            f"{CLOCK} a running",
            f"{CLOCK} a succeeded in {DURATION}",
            f"{CLOCK} b running",
            f"{CLOCK} b failed: RuntimeError: b was told to fail",
            f"{CLOCK} c upstream_failed: not run: b failed",
            "",
            "state: failed   active generation: none",
            rf"run {run.pk}: failed   started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC   "
            rf"took {DURATION}   by start_init",
            "error: phase b failed: RuntimeError: b was told to fail",
            r"PHASE  STATE            REASON       PROGRESS  ATTEMPT  LOST  DURATION  "
            "MESSAGE",
            rf"a      succeeded        never built  100%      1/1      0/3   {DURATION} +"
            "step 40 of 40",
            rf"b      failed           never built  100%      1/1      0/3   {DURATION} +"
            "RuntimeError: b was told to fail",
            r"c      upstream_failed  never built  0%        0/3      0/3   -         not run: b "
            "failed",
        ],
    )
    assert published.name == "a_out"

    # start_init --wait on the failed pipeline: exit 1, the reason on stderr.
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 1
    second = PipelineRun.objects.latest_first().first()
    assert second is not None
    # (Above it, the initpipeline logger's INFO lines.)
    assert result.stderr.splitlines()[-1] == (
        f"CommandError: run {second.pk} failed: phase b failed: RuntimeError: b was told to fail"
    )
    assert_lines(
        events(result.stdout),
        [
            f"run {second.pk} enqueued",
            f"{CLOCK} a cached",
            f"{CLOCK} b running",
            f"{CLOCK} b failed: RuntimeError: b was told to fail",
            f"{CLOCK} c upstream_failed: not run: b failed",
            f"run {second.pk} failed in {DURATION}",
            r"  a  cached           -",
            f"  b  failed           {DURATION}",
            r"  c  upstream_failed  -",
            "cached: a",
            "error: phase b failed: RuntimeError: b was told to fail",
        ],
    )


# -- a terminal ----------------------------------------------------------------------------

SGR = re.compile(r"\x1b\[([0-9;]*)m")
COLOUR = {*range(30, 39), *range(40, 49), *range(90, 98), *range(100, 108)}


def colours(output: str) -> set[int]:
    """The colour codes among the output's SGR escape sequences."""
    found = set()
    for params in SGR.findall(output):
        codes = [int(c) for c in params.split(";") if c]
        found |= {c for c in codes if c in COLOUR}
    return found


def in_terminal(stack: Stack, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run manage.py with stdout on a pseudo-terminal; returns (exit code, stdout, stderr)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env={**stack.env, "TERM": "xterm-256color", "COLUMNS": "120", **env},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace"), stderr


def test_terminal_output_is_coloured_unless_no_color(stack: Stack) -> None:
    stack.start_worker()
    stack.control(sleep={"b": 1.0})
    code, out, err = in_terminal(stack, "start_init", "--wait", env={})
    assert code == 0, err + stack.log()
    assert colours(out), out  # rich's bars are coloured on a terminal
    assert "\x1b[?25l" in out  # and drawn live (cursor hidden while they move)
    run = PipelineRun.objects.get()
    assert f"run {run.pk} succeeded in" in out

    code, out, err = in_terminal(stack, "start_init", "--wait", "--force", env={"NO_COLOR": "1"})
    assert code == 0, err + stack.log()
    assert colours(out) == set(), out
    assert "\x1b[?25l" in out  # still live bars, only without colour
    second = PipelineRun.objects.latest_first().first()
    assert second is not None and second.pk != run.pk
    assert f"run {second.pk} succeeded in" in out


# -- a broker that refuses, or accepts and never answers -------------------------------------


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_start_init_against_a_broker_that_never_answers_fails_in_one_line(
    stack: Stack, silent: SilentServer, scheme: str
) -> None:
    url = f"redis://127.0.0.1:{silent.port}/0"
    if scheme == "amqp":
        url = f"amqp://guest:guest@127.0.0.1:{silent.port}//"
    # A hang would end in subprocess.TimeoutExpired: the bound is SEND_TIMEOUT (5 s) a step.
    result = stack.manage("start_init", env={"CELERY_BROKER_URL": url}, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(
        "CommandError: could not send the run's tasks to the broker: OperationalError: "
    )
    run = PipelineRun.objects.get()
    # Not left pending, and not a failed init: nothing ran.
    assert (run.state, run.error) == ("cancelled", "not started: " + result.stderr[14:].strip())
    assert set(run.phases.values_list("state", flat=True)) == {"cancelled"}
    status = stack.manage("init_status", "--json")
    assert status.returncode == 3  # not ready (no generation yet), not 1 (failed)
    assert json.loads(status.stdout)["state"] == "not_ready"


def test_start_init_wait_against_a_refused_broker_prints_one_line(stack: Stack) -> None:
    refused = f"redis://127.0.0.1:{free_port()}/0"
    result = stack.manage("start_init", "--wait", env={"CELERY_BROKER_URL": refused})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "CommandError: could not send the run's tasks to the broker: OperationalError: "
        f"Error 111 connecting to 127.0.0.1:{refused.split(':')[2].split('/')[0]}. "
        "Connection refused."
    ]


def test_cancel_init_against_a_broker_that_never_answers_still_cancels(
    stack: Stack, silent: SilentServer
) -> None:
    stack.control(sleep={"a": 30})
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    wait_for(lambda: run.phases.filter(name="a", state="running").exists(), timeout=60)
    # The revoke is bounded: the run is cancelled in the database whatever the broker does.
    hung = {"CELERY_BROKER_URL": f"redis://127.0.0.1:{silent.port}/0"}
    result = stack.manage("cancel_init", env=hung, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"run {run.pk} cancelled\n"
    assert "could not revoke the tasks of run" in result.stderr
    run.refresh_from_db()
    assert run.state == "cancelled"


def test_phase_messages_are_text_on_a_terminal(stack: Stack) -> None:
    # Rich markup and terminal escapes in a message: shown as text, never interpreted.
    stack.control(sleep={"b": 1.0}, message={"b": "copied [/tmp] done \x1b]0;pwned\x07\x1b[2J"})
    stack.start_worker()
    code, out, err = in_terminal(stack, "start_init", "--wait", env={"NO_COLOR": "1"})
    assert code == 0, err + stack.log()
    assert "copied [/tmp] done" in out
    assert "pwned" not in out and "\x1b[2J" not in out
    code, out, err = in_terminal(stack, "init_status", env={"NO_COLOR": "1"})
    assert (code, err) == (0, "")
    assert "\x1b]0;" not in out


def test_a_locked_database_is_one_line_and_exit_2(stack: Stack) -> None:
    import sqlite3

    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("the lock is SQLite's; PostgreSQL waits for its own")
    holder = sqlite3.connect(connection.settings_dict["NAME"])
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = stack.manage("start_init", env={"INITPIPELINE_TEST_DB_TIMEOUT": "0.5"})
    finally:
        holder.rollback()
        holder.close()
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "CommandError: the database cannot be used: database is locked"
    ]


# -- what start_init runs, and its JSON ------------------------------------------------------


def ran(stack: Stack, run: PipelineRun) -> list[str]:
    """The phases of ``run`` that really ran (tests/testapp's executions log)."""
    return [name for name, _ in stack.executions(run.pk)]


def latest() -> PipelineRun:
    run = PipelineRun.objects.latest_first().first()
    assert run is not None
    return run


def test_only_and_from_rerun_exactly_the_named_phases(stack: Stack) -> None:
    stack.start_worker()
    assert stack.manage("start_init", "--wait").returncode == 0

    # --only: just these, not what depends on them (c's fingerprint is unchanged: cached).
    result = stack.manage("start_init", "--wait", "--only", "a", "b")
    assert result.returncode == 0, result.stderr + stack.log()
    run = latest()
    assert dict(run.phases.values_list("name", "state")) == {
        "a": "succeeded",
        "b": "succeeded",
        "c": "cached",
    }
    assert ran(stack, run) == ["a", "b"]
    assert run.options == {"force": False, "from": None, "only": ["a", "b"]}

    # --from: the phase and its dependants, nothing upstream.
    result = stack.manage("start_init", "--wait", "--from", "b")
    assert result.returncode == 0, result.stderr + stack.log()
    run = latest()
    assert dict(run.phases.values_list("name", "state")) == {
        "a": "cached",
        "b": "succeeded",
        "c": "succeeded",
    }
    assert ran(stack, run) == ["b", "c"]

    # Nothing named: nothing runs.
    result = stack.manage("start_init")
    generation = Generation.objects.get(is_active=True)
    assert result.stdout == f"up to date: generation {generation.pk} is active\n"
    assert generation.run_id == run.pk


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def phase_json(pr: PhaseRun) -> dict[str, Any]:
    """What start_init --json and init_status --json say of a phase record (README)."""
    return {
        "name": pr.name,
        "state": pr.state,
        "reason": pr.reason or None,
        "progress": round(pr.progress, 4),
        "message": pr.message,
        "attempt": pr.attempt,
        "max_attempts": pr.max_attempts,
        "losses": pr.losses,
        "max_losses": pr.max_losses,
        "handoffs": pr.handoffs,
        "checkpoint_at": (pr.checkpoint or {}).get("at"),
        "timeout": pr.timeout,
        "started_at": iso(pr.started_at),
        "finished_at": iso(pr.finished_at),
        "duration": pr.duration,
        "error": None,
    }


def run_json(run: PipelineRun, estimate: float | None = None) -> dict[str, Any]:
    run.refresh_from_db()
    return {
        "id": run.pk,
        "state": run.state,
        "trigger": "start_init",
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "error": None,
        "phases": [phase_json(p) for p in run.phases.order_by("position")],
        "estimate_remaining": estimate,
    }


def start_json(stack: Stack, *args: str) -> dict[str, Any]:
    result = stack.manage("start_init", "--json", *args)
    assert result.returncode == 0, result.stderr + stack.log()
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_start_init_json_of_each_outcome_and_init_status_until_the_first_run_ends(
    stack: Stack,
) -> None:
    stack.control(hold=["a"])
    # No worker yet: the run waits in the queue.
    enqueued = start_json(stack)
    run = PipelineRun.objects.get()
    assert run.state == "pending"
    assert [(p.name, p.max_attempts, p.timeout) for p in run.phases.order_by("position")] == [
        ("a", 1, 3600),
        ("b", 1, 3600),
        ("c", 3, 3600),
    ]
    assert enqueued == {
        "outcome": "enqueued",
        "superseded": None,
        "generation": None,
        "run": run_json(run),
    }
    assert start_json(stack) == {
        "outcome": "attached",
        "superseded": None,
        "generation": None,
        "run": run_json(run),
    }

    # The first run in flight, pending then running: not ready yet.
    status = stack.manage("init_status")
    assert (status.returncode, status.stdout.splitlines()[0]) == (
        3,
        "state: not_ready   active generation: none",
    )
    stack.start_worker()
    wait_for(lambda: run.phases.filter(name="a", state="running").exists(), timeout=60)
    status = stack.manage("init_status", "--json")
    assert status.returncode == 3
    assert json.loads(status.stdout)["state"] == "not_ready"
    assert json.loads(status.stdout)["run"]["phases"][0]["state"] == "running"

    stack.control()  # a may end
    wait_for(lambda: PipelineRun.objects.get().state == "succeeded", timeout=60)
    assert stack.manage("init_status").returncode == 0
    generation = Generation.objects.get(is_active=True)
    assert start_json(stack) == {
        "outcome": "up_to_date",
        "superseded": None,
        "generation": generation.pk,
        "run": None,
    }

    # --wait: one object, once the run has ended.
    waited = start_json(stack, "--wait", "--force")
    second = latest()
    assert second.pk != run.pk and second.state == "succeeded"
    assert waited == {
        "outcome": "enqueued",
        "superseded": None,
        "generation": None,
        "run": run_json(second, estimate=0.0),  # nothing left of a run that succeeded
    }
    assert [p["state"] for p in waited["run"]["phases"]] == ["succeeded"] * 3


def test_start_init_wait_exits_1_when_the_run_is_cancelled(stack: Stack) -> None:
    stack.control(hold=["b"])
    stack.start_worker()
    waiting = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "start_init", "--wait"],
        cwd=ROOT,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run = wait_for(lambda: PipelineRun.objects.first(), timeout=60)
        wait_for(lambda: run.phases.filter(name="b", state="running").exists(), timeout=60)
        cancelled = stack.manage("cancel_init")
        assert cancelled.returncode == 0, cancelled.stderr
        out, err = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 1, out + err
    assert err.splitlines()[-1] == f"CommandError: run {run.pk} cancelled: cancelled"
    assert_lines(
        events(out),
        [
            f"run {run.pk} enqueued",
            f"{CLOCK} a running",
            f"{CLOCK} a succeeded in {DURATION}",
            f"{CLOCK} b running",
            # The run ends at the cancel; b records that it stopped a moment later.
            rf"{CLOCK} b cancelled(; stopped after \d+\.\d s)?",
            f"{CLOCK} c cancelled",
            f"run {run.pk} cancelled in {DURATION}",
            f"  a  succeeded  {DURATION}",
            f"  b  cancelled  {DURATION}",
            r"  c  cancelled  -",
            "artifacts published, not active:",
            r"  a_out  json  \d+ B  blake3:[0-9a-f]{12}",
            "error: cancelled",
        ],
    )
