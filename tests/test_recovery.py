"""Nothing lost: killed workers, a restarted Redis, cancel and bad artifacts, in real processes.

Each test ends with the run succeeded and every artifact verified, or in the state it names.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from initpipeline import digests, formats, loading, storage
from initpipeline.conf import settings as conf
from initpipeline.exceptions import ArtifactCorrupt, ArtifactSignatureError
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun
from tests.conftest import (
    ROOT,
    Call,
    RedisServer,
    Stack,
    brokers,
    free_port,
    missing_service,
    wait_for,
)

pytestmark = [pytest.mark.slow]
STALE_AFTER = 5.0
# Every phase may run three times: a killed worker costs its phase one attempt.
RETRIES = {"TESTAPP_PHASE_OPTIONS": json.dumps({"a": {"retries": 2}, "b": {"retries": 2}})}
# tests/testapp's phases make a progress() call every 0.1 s (or more, on a loaded machine).
STEP = 0.1


def executions(stack: Stack, run: PipelineRun) -> list[tuple[str, int]]:
    """(phase, attempt) of every time a phase of ``run`` really started, in order."""
    return stack.executions(run.pk)


def kill(stack: Stack, n: int = 0) -> None:
    """SIGKILL worker ``n`` with its pool processes: no shutdown code runs anywhere."""
    proc = stack.workers[n]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def phase(run: PipelineRun, name: str) -> PhaseRun:
    return PhaseRun.objects.get(run=run, name=name)


def states(run: PipelineRun) -> dict[str, str]:
    return dict(run.phases.order_by("position").values_list("name", "state"))


def wait_ended(run: PipelineRun, stack: Stack, timeout: float = 90) -> PipelineRun:
    try:
        wait_for(
            lambda: PipelineRun.objects.get(pk=run.pk).state not in ("pending", "running"),
            timeout=timeout,
        )
    except AssertionError:
        logs = "\n".join(stack.log(n) for n in range(len(stack.workers)))
        raise AssertionError(f"run {run.pk} did not end: {states(run)}\n{logs}") from None
    run.refresh_from_db()
    return run


def assert_active_generation_verifies(run: PipelineRun) -> None:
    generation = Generation.objects.get(is_active=True)
    assert generation.run_id == run.pk
    assert sorted(generation.artifact_map()) == ["a_out", "b_out", "c_out"]
    for record in generation.artifacts.all():
        storage.verify(record)


# -- killed workers -----------------------------------------------------------------------


# RabbitMQ gives the killed worker's message back at once: the new worker's copy finds the
# heartbeat fresh and skips it, and recovery sends the phase again once it is stale.
@brokers("filesystem", "redis")
@pytest.mark.parametrize("victim", ["a", "b", "c"])
def test_sigkill_mid_phase_then_a_new_worker_completes_the_run(stack: Stack, victim: str) -> None:
    if stack.broker == "redis":
        # Redis gives the killed worker's message back within seconds, so the redelivered
        # copy, the new worker's recovery and the claim on the row all meet.
        stack.env["DJANGO_SETTINGS_MODULE"] = "tests.testapp.settings_redelivery"
    stack.control(sleep={victim: 3})
    stack.start_worker()
    assert stack.manage("start_init", env=RETRIES).returncode == 0
    run = PipelineRun.objects.get()
    wait_for(lambda: phase(run, victim).progress >= 0.2, timeout=60)
    kill(stack)
    if stack.broker == "redis":
        # Start the new worker once the phase is stale: the redelivered copy may take it over.
        wait_for(
            lambda: phase(run, victim).heartbeat_age(timezone.now()) >= STALE_AFTER, timeout=60
        )
    stack.start_worker()
    # Taken over from its stale heartbeat: a new lease on the row (a loss, not an attempt).
    wait_for(lambda: phase(run, victim).lease == 2, timeout=60)

    run = wait_ended(run, stack)
    assert run.state == "succeeded", run.error + stack.log(1)
    assert states(run) == {"a": "succeeded", "b": "succeeded", "c": "succeeded"}
    assert_active_generation_verifies(run)
    pr = phase(run, victim)
    assert (pr.attempt, pr.max_attempts, pr.losses) == (1, 3, 1)
    # Exactly one copy ran the phase after the kill, and every other phase ran once.
    ran = executions(stack, run)
    assert sorted(ran) == sorted([(n, 1) for n in "abc"] + [(victim, 1)])


def test_sigkill_while_writing_an_artifact_never_shows_a_partial_file(
    stack: Stack, artifacts_dir: Path
) -> None:
    size = 4_000_000
    stack.control(slow_write={"c": {"bytes": size, "seconds": 3}})
    earlier = set(artifacts_dir.glob("c_out/*"))  # the folder outlives earlier tests' records
    reader = ContentReader(artifacts_dir)
    reader.start()
    try:
        stack.start_worker()
        assert stack.manage("start_init").returncode == 0
        run = PipelineRun.objects.get()
        wait_for(lambda: phase(run, "c").message.startswith("writing c_out: chunk 1"), 60)
        partial = artifacts_dir / ".partial"
        wait_for(lambda: any(p.stat().st_size > 0 for p in partial.iterdir()), 10)
        kill(stack)
        # The kill landed mid-write: a scratch file stopped short, and nothing else shows.
        sizes = [p.stat().st_size for p in partial.iterdir()]
        assert any(0 < s < size for s in sizes), sizes
        assert set(artifacts_dir.glob("c_out/*")) == earlier
        assert not Artifact.objects.filter(name="c_out").exists()

        stack.start_worker()
        run = wait_ended(run, stack)
    finally:
        reader.stop()
    assert run.state == "succeeded", run.error
    assert_active_generation_verifies(run)
    assert Artifact.objects.get(name="c_out").size == size
    assert reader.errors == []
    assert reader.files_checked >= 3  # a_out, b_out and c_out were each seen whole
    assert reader.scans > 50


class ContentReader(threading.Thread):
    """Looks at every artifact file outside .partial/, all the time, as a reader would.

    A key is ``<name>/blake3-<hex><suffix>``: a file whose bytes do not hash to its own
    name is a partial (or corrupt) file that a reader could have opened.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stopped = threading.Event()
        self.errors: list[str] = []
        self.seen: dict[Path, tuple[int, int]] = {}
        self.scans = 0

    @property
    def files_checked(self) -> int:
        return len(self.seen)

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            self.scans += 1
            for path in self.root.glob("*/*"):
                if path.parent.name == ".partial":
                    continue
                try:
                    stat = path.stat()
                    if self.seen.get(path) == (stat.st_size, stat.st_mtime_ns):
                        continue
                    digest = digests.name_part(digests.of_file(path)[0])
                except FileNotFoundError:
                    continue
                if not path.name.startswith(digest):
                    self.errors.append(f"{path} ({stat.st_size} bytes) hashes to {digest}")
                self.seen[path] = (stat.st_size, stat.st_mtime_ns)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)


# -- a restarted Redis --------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test only: it is stopped and started again on the same port."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing_service("redis-server is not installed (apt-get install redis-server)")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(binary, workdir)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("stack", ["redis"], indirect=True)
def test_redis_restart_in_the_middle_of_a_run(
    stack: Stack, own_redis: RedisServer, tmp_path: Path
) -> None:
    # A Redis stack, on a server of this test's own, which it stops and starts again.
    stack.redis = own_redis
    stack.env["CELERY_BROKER_URL"] = own_redis.url
    stack.control(hold=["b"])
    stack.start_worker()
    assert stack.manage("start_init", env=RETRIES).returncode == 0
    run = PipelineRun.objects.get()
    wait_for(lambda: phase(run, "b").progress > 0, timeout=60)
    # Without persistence, the restart loses every queued and unacknowledged message. Redis
    # stays down while b ends and until Celery gives up sending the chain's next step, which
    # ends b's task: c's message is lost for good, and only recovery can send it again.
    own_redis.stop()
    stack.control()  # b may end now
    task = re.escape(phase(run, "b").task_id)
    ended = re.compile(rf"Task initpipeline\.run_phase\[{task}\] (succeeded|raised)")
    wait_for(lambda: ended.search(stack.log()), timeout=120, what="b's task did not end")
    assert phase(run, "b").state == "succeeded"
    assert phase(run, "c").state == "pending"
    own_redis.start()
    run = wait_ended(run, stack)
    assert run.state == "succeeded", run.error + stack.log()
    assert_active_generation_verifies(run)
    # An idle worker's recovery saw c pending and sent it again, and c ran exactly once.
    assert f"recovery: run {run.pk}, c resent: " in stack.log()
    assert sorted(executions(stack, run)) == [("a", 1), ("b", 1), ("c", 1)]


# -- web server, worker and watcher on one SQLite file ------------------------------------


def test_web_worker_and_watch_share_the_sqlite_file_without_lock_errors(
    stack: Stack, tmp_path: Path
) -> None:
    port = free_port()
    web_log = tmp_path / "web.log"
    web = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=stack.env,
        stdout=open(web_log, "wb"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    poller = Poller(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: poller.get("/init/livez") == 200, timeout=30)
        stack.control(sleep={"a": 2, "b": 2, "c": 2})
        stack.start_worker()
        poller.start()
        started = stack.manage("start_init")
        assert started.returncode == 0, started.stderr
        watch = stack.manage("init_status", "--watch", timeout=120)
        waited = stack.manage("start_init", "--wait")
        # A few more polls of the ready site.
        polled = len(poller.answers)
        wait_for(lambda: len(poller.answers) >= polled + 20, timeout=60)
    finally:
        poller.stop()
        os.killpg(web.pid, signal.SIGKILL)
        web.wait()
    run = PipelineRun.objects.get()
    assert run.state == "succeeded"
    assert_active_generation_verifies(run)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert waited.returncode == 0, waited.stderr
    outputs = {
        "web": web_log.read_text(errors="replace"),
        "worker": stack.log(),
        "init_status --watch": watch.stdout + watch.stderr,
        "start_init": started.stdout + started.stderr + waited.stdout + waited.stderr,
    }
    for name, text in outputs.items():
        assert "database is locked" not in text, f"{name}:\n{text}"
    # readyz said "not yet" while the run went on and "ready" once it ended; never 500.
    codes = [code for path, code in poller.answers if path == "/init/readyz"]
    assert set(codes) <= {200, 503}, poller.answers
    assert codes[0] == 503 and codes[-1] == 200
    assert len(codes) > 20
    totals = [code for path, code in poller.answers if path == "/test/b-total"]
    assert set(totals) <= {200, 503} and totals[-1] == 200


class Poller(threading.Thread):
    """Asks the web server for /init/readyz and a page that needs an artifact, in a loop."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.stopped = threading.Event()
        self.answers: list[tuple[str, int]] = []

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            for path in ("/init/readyz", "/test/b-total"):
                self.answers.append((path, self.get(path)))

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=15)


# -- artifacts that changed on disk -------------------------------------------------------


def test_flipped_byte_is_refused_and_start_init_rebuilds_the_artifact(
    stack: Stack, artifacts_dir: Path
) -> None:
    stack.start_worker()
    assert stack.manage("start_init", "--wait").returncode == 0
    first = Generation.objects.get(is_active=True)
    record = first.artifact_map()["b_out"]
    path = artifacts_dir / record.storage_key
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))

    with pytest.raises(ArtifactCorrupt, match="fails its checksum"):
        storage.verify(record)
    loading.active.refresh()
    with pytest.raises(ArtifactCorrupt, match="fails its checksum"):
        loading.artifact("b_out").get()

    # The fingerprints match the active generation, but its b_out does not verify.
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + stack.log()
    run = PipelineRun.objects.latest_first().first()
    assert run is not None and run.pk != first.run_id
    assert states(run) == {"a": "cached", "b": "succeeded", "c": "cached"}
    assert_active_generation_verifies(run)
    assert path.read_bytes() == good  # same content, same key: the file was put back whole
    loading.active.refresh()
    assert float(loading.artifact("b_out").get().sum()) == float(sum(2 * i + 1 for i in range(10)))


def evil_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when it is loaded."""

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (open, (str(marker), "w"))

    return pickle.dumps(Evil())


@pytest.mark.parametrize("forgery", ["unsigned", "wrong key"])
def test_replaced_pickle_artifact_is_refused_and_none_of_its_code_runs(
    stack: Stack, artifacts_dir: Path, tmp_path: Path, forgery: str
) -> None:
    stack.control(pickle=["a"])
    stack.start_worker()
    assert stack.manage("start_init", "--wait").returncode == 0
    record = Artifact.objects.get(name="a_out")
    assert record.format == "pickle"

    # The payload is live: loaded without our check, it creates its marker.
    probe = tmp_path / "probe"
    pickle.loads(evil_pickle(probe))  # noqa: S301 - proving the test payload works
    assert probe.exists()

    marker = tmp_path / "pwned"
    payload = evil_pickle(marker)
    if forgery == "unsigned":
        blob = payload
    else:
        signature = hmac.new(b"another secret key", payload, hashlib.sha256).digest()
        blob = formats.PICKLE_MAGIC + signature + payload
    path = artifacts_dir / record.storage_key
    original = path.read_bytes()
    path.write_bytes(blob)
    # Its checksum is recorded too: only the signature can catch it.
    record.digest, record.size = storage.file_digest(path)
    record.save(update_fields=["digest", "size"])
    expected = {
        "unsigned": "is not a signed initpipeline pickle; refused",
        "wrong key": "has a wrong signature (tampered, or signed with a key that is neither "
        "SECRET_KEY nor in SECRET_KEY_FALLBACKS); refused before unpickling",
    }[forgery]
    with pytest.raises(ArtifactSignatureError, match=re.escape(expected)):
        formats.read(path, "pickle")
    # Verification checks the signature too, before anything loads it: the artifact no
    # longer counts as a cache.
    with pytest.raises(ArtifactSignatureError, match="has no valid signature"):
        storage.verify(record)
    assert not storage.is_valid(record)

    result = stack.manage("start_init", "--wait", "--from", "b")
    assert result.returncode == 0, result.stderr + stack.log()
    run = PipelineRun.objects.latest_first().first()
    assert run is not None
    # a is built again (its artifact failed its check); b loads the new, signed one.
    assert states(run) == {"a": "succeeded", "b": "succeeded", "c": "succeeded"}
    assert path.read_bytes() == original  # the same signed bytes, under the same key
    assert not marker.exists()


# -- timeouts and cancel ------------------------------------------------------------------


def test_timed_out_phase_is_stopped_retried_and_recorded(stack: Stack) -> None:
    stack.start_worker()
    stack.control(sleep={"b": 20})
    options = {"TESTAPP_PHASE_OPTIONS": json.dumps({"b": {"timeout": 1, "retries": 1}})}
    result = stack.manage("start_init", "--wait", env=options)
    assert result.returncode == 1
    run = PipelineRun.objects.get()
    assert states(run) == {"a": "succeeded", "b": "failed", "c": "upstream_failed"}
    b = phase(run, "b")
    assert (b.attempt, b.max_attempts, b.timeout) == (2, 2, 1)
    assert b.error == "timed out after 1 s (Celery soft time limit)"
    # Each attempt was stopped at its limit, early in its 200 steps of 0.1 s.
    steps = [(c.attempt, c.step) for c in stack.calls(run.pk) if c.phase == "b"]
    assert {attempt for attempt, _ in steps} == {1, 2}
    assert max(step for _, step in steps) < 100, steps
    status = json.loads(stack.manage("init_status", "--json").stdout)
    b_status = {p["name"]: p for p in status["run"]["phases"]}["b"]
    assert (b_status["attempt"], b_status["max_attempts"], b_status["timeout"]) == (2, 2, 1)
    assert b_status["error"].startswith("timed out after 1 s")


def task_ended(stack: Stack, pr: PhaseRun, outcome: str) -> None:
    """Wait until the worker log says the phase's task ended with ``outcome``."""
    line = re.compile(rf"Task initpipeline\.run_phase\[{re.escape(pr.task_id)}\] {outcome}")
    wait_for(lambda: line.search(stack.log()), timeout=60, what=f"no task {outcome}")


def calls_after_last_beat(stack: Stack, run: PipelineRun, name: str) -> list[Call]:
    """The phase's progress() and heartbeat() calls after its last write that still counted:
    the row's heartbeat_at, which no write of a cancelled run changes."""
    pr = phase(run, name)
    assert pr.heartbeat_at is not None
    return [c for c in stack.calls(run.pk) if c.phase == name and c.at > pr.heartbeat_at]


def test_cancel_mid_phase_stops_it_at_its_next_write_and_the_old_generation_serves(
    stack: Stack,
) -> None:
    stack.start_worker()
    assert stack.manage("start_init", "--wait").returncode == 0
    previous = Generation.objects.get(is_active=True)

    stack.control(versions={"b": "2"}, hold=["b"])
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.latest_first().first()
    assert run is not None
    wait_for(lambda: phase(run, "b").progress > 0, timeout=60)
    result = stack.manage("cancel_init", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["cancelled"], data["run"]["id"], data["run"]["state"]) == (
        True,
        run.pk,
        "cancelled",
    )

    wait_for(lambda: phase(run, "b").message.startswith("cancelled; stopped after"), 60)
    run.refresh_from_db()
    assert (run.state, run.error) == ("cancelled", "cancelled")
    assert states(run) == {"a": "cached", "b": "cancelled", "c": "cancelled"}
    # It stopped at its first write after the cancel: a progress() write (progress() writes
    # at most every PROGRESS_INTERVAL) or the heartbeat thread's, whichever came
    # first. So after its last write that counted it made at most one write interval's
    # calls, 0.1 s apart or more, the last of which stopped it.
    after = calls_after_last_beat(stack, run, "b")
    assert len(after) <= conf.PROGRESS_INTERVAL / STEP + 1, after

    # Nothing of the run goes on once b's task has ended.
    task_ended(stack, phase(run, "b"), "ignored")
    assert Generation.objects.get(is_active=True).pk == previous.pk
    assert not Generation.objects.filter(run=run).exists()
    assert [name for name, _ in executions(stack, run)] == ["b"]
    assert "succeeded" not in stack.log().split(f"run {run.pk}")[-1]
    loading.active.refresh()
    response = Client().get("/test/b-total")
    assert response.status_code == 200
    assert response.json()["generation"] == previous.pk

    again = stack.manage("cancel_init")
    assert again.returncode == 1
    assert again.stderr.strip() == f"CommandError: nothing to cancel: run {run.pk} is cancelled"


def test_a_phase_that_only_heartbeats_stops_at_its_next_heartbeat_after_a_cancel(
    stack: Stack,
) -> None:
    stack.control(heartbeat={"b": 120})
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    wait_for(lambda: any(c.phase == "b" for c in stack.calls(run.pk)), timeout=60)
    assert stack.manage("cancel_init").returncode == 0
    wait_for(lambda: phase(run, "b").message.startswith("cancelled; stopped after"), 60)
    calls = [c for c in stack.calls(run.pk) if c.phase == "b"]
    assert {c.kind for c in calls} == {"heartbeat"}  # never a progress() call
    # heartbeat() writes: the first one after the cancel, which no longer counts, stops it.
    assert len(calls_after_last_beat(stack, run, "b")) <= 1
    assert calls[-1].step < 1200  # of its 120 s of heartbeats
    task_ended(stack, phase(run, "b"), "ignored")
    assert [name for name, _ in executions(stack, run)] == ["a", "b"]


def test_heartbeat_calls_alone_keep_a_phase_alive_and_silence_does_not(stack: Stack) -> None:
    # No heartbeat thread (its interval is an hour): a phase shows it is alive by its own
    # calls only, and a worker checks every STALE_AFTER/2 for phases silent for STALE_AFTER.
    stale_after = 2.0
    overrides = {"HEARTBEAT_INTERVAL": 3600, "STALE_AFTER": stale_after}
    stack.env["INITPIPELINE_TEST_SETTINGS"] = json.dumps(overrides)
    # a calls heartbeat() for more than twice STALE_AFTER; b, silent, waits to be taken over.
    stack.control(heartbeat={"a": 2 * stale_after + 0.5}, silent={"b": 60})
    stack.start_worker()
    assert stack.manage("start_init", env=RETRIES).returncode == 0
    run = wait_ended(PipelineRun.objects.get(), stack)
    assert run.state == "succeeded", run.error + stack.log()
    a, b = phase(run, "a"), phase(run, "b")
    assert a.attempt == 1
    assert a.started_at and a.finished_at
    assert (a.finished_at - a.started_at).total_seconds() > 2 * stale_after
    assert {c.kind for c in stack.calls(run.pk) if c.phase == "a"} == {"heartbeat"}
    # Its silence cost a loss, not an attempt.
    assert (b.attempt, b.losses) == (1, 1)
    assert f"recovery: run {run.pk}, b resent: worker " in stack.log()
    assert executions(stack, run) == [("a", 1), ("b", 1), ("b", 1), ("c", 1)]


def test_cancel_init_exit_codes(stack: Stack) -> None:
    nothing = stack.manage("cancel_init")
    assert (nothing.returncode, nothing.stderr.strip()) == (
        1,
        "CommandError: nothing to cancel: no run yet",
    )
    missing = stack.manage("cancel_init", "--run", "999")
    assert (missing.returncode, missing.stderr.strip()) == (2, "CommandError: there is no run 999")
    usage = stack.manage("cancel_init", "--run", "x")
    assert usage.returncode == 2
    # No worker: the run stays pending, and cancel_init cancels it by id.
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()
    cancelled = stack.manage("cancel_init", "--run", str(run.pk))
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"run {run.pk} cancelled")
    assert states(run) == {"a": "cancelled", "b": "cancelled", "c": "cancelled"}
    helped = stack.manage("cancel_init", "--help")
    assert "Exit codes: 0 cancelled; 1 nothing to cancel" in " ".join(helped.stdout.split())
