"""A real Gunicorn, a real worker: the site answers at once and switches generations live."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from initpipeline.models import Generation
from tests.conftest import ROOT, Stack, free_port, wait_for

pytestmark = [pytest.mark.slow]


class Gunicorn:
    def __init__(self, stack: Stack, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = stack.tmp / f"gunicorn-{self.port}.log"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "tests.wsgi:application",
                "-c",
                str(ROOT / "project" / "gunicorn.conf.py"),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--access-logfile",
                "-",
                *args,
            ],
            cwd=ROOT,
            env={**stack.env, **(env or {})},
            stdout=open(self.log_path, "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(
        self, path: str, timeout: float = 5, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url(path), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def wait_until_up(self, timeout: float = 30) -> float:
        def up() -> bool:
            assert self.proc.poll() is None, self.log()
            try:
                return self.get("/init/livez", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(up, timeout, interval=0.02)
        return time.monotonic() - self.started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def gunicorn(stack: Stack) -> Iterator[Any]:
    servers: list[Gunicorn] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Gunicorn:
        server = Gunicorn(stack, *args, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_site_answers_at_once_and_never_times_out_during_a_30s_init(
    stack: Stack, gunicorn: Any
) -> None:
    server = gunicorn("--workers", "2", "--timeout", "10")
    server.wait_until_up()
    stack.start_worker()
    stack.control(sleep={"a": 12, "b": 12, "c": 8})
    assert stack.manage("start_init").returncode == 0

    started = time.monotonic()
    ready_codes: list[int] = []
    while time.monotonic() - started < 120:
        # Served while the init runs: a process waiting for the 32 s init would time out.
        status, _, _ = server.get("/init/livez", timeout=10)
        assert status == 200
        code, headers, body = server.get("/init/readyz")
        ready_codes.append(code)
        if code == 200:
            break
        assert code == 503, body
        assert headers["Retry-After"] == "1"
        assert json.loads(body)["status"] == "fail"
        active = Generation.objects.filter(is_active=True).exists()
        page, page_headers, _ = server.get("/test/b-total", Accept="application/json")
        if not active:
            assert page == 503 and page_headers["Cache-Control"] == "no-store"
        else:
            # Active, and this worker loaded it: it serves, while the probe waits for
            # every worker of the server (test_gunicorn_serving.py).
            assert page in (200, 503)
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    assert ready_codes[-1] == 200, stack.log()
    assert ready_codes.count(503) > 10
    # b_out (the required artifact) exists only when the whole run has activated.
    assert elapsed >= 30
    status, _, body = server.get("/test/b-total")
    assert status == 200 and json.loads(body)["total"] == 100.0
    log = server.log()
    assert "WORKER TIMEOUT" not in log
    assert log.count("Booting worker") == 2  # no worker was replaced


def test_search_page_goes_from_warming_up_to_results(stack: Stack, gunicorn: Any) -> None:
    demo = {"INITPIPELINE_TEST_PIPELINE": "demo", "SEARCH_MAX_DOCS": "250"}
    server = gunicorn("--workers", "2", env=demo)
    server.wait_until_up()
    status, headers, body = server.get("/?q=json", Accept="text/html")
    assert status == 503
    assert b"<title>Warming up</title>" in body
    assert headers["Retry-After"] == "1"

    stack.start_worker(env=demo)
    result = stack.manage("start_init", "--wait", env=demo, timeout=300)
    assert result.returncode == 0, result.stderr
    generation = Generation.objects.get(is_active=True)

    def results() -> bytes | None:
        code, _, page = server.get("/?q=encode+decode+json+data", Accept="text/html")
        return page if code == 200 else None

    page = wait_for(results, timeout=10)
    assert f'generation <span id="generation">{generation.pk}</span>'.encode() in page
    assert b'<ol id="results">' in page
    assert page.count(b'<div class="title">') == 10


def test_new_generation_reaches_every_worker_with_zero_failed_requests(
    stack: Stack, gunicorn: Any
) -> None:
    server = gunicorn("--workers", "2", "--threads", "2")
    server.wait_until_up()
    stack.start_worker()
    assert stack.manage("start_init", "--wait").returncode == 0
    old = Generation.objects.get(is_active=True).pk
    # Each worker loads it in the background; from the probe's first 200 on, none of the
    # requests below may fail, the switch to the next generation included.
    wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=30)

    seen: list[Answer] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                code, _, body = server.get("/test/b-total", timeout=5)
            except OSError as exc:
                failures.append(repr(exc))
                continue
            if code != 200:
                failures.append(f"{code}: {body[:200]!r}")
                continue
            data = json.loads(body)
            seen.append(
                Answer(sent, time.monotonic(), data["pid"], data["generation"], data["total"])
            )

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len({a.pid for a in seen}) == 2, timeout=30)
        pids = {a.pid for a in seen}
        stack.control(versions={"b": "2"})
        assert stack.manage("start_init", "--wait").returncode == 0
        new = Generation.objects.get(is_active=True).pk
        assert new != old
        # Every worker serves the new generation, and goes on answering for a while.
        wait_for(lambda: {a.pid for a in seen if a.generation == new} == pids, timeout=30)
        answered = len(seen)
        wait_for(lambda: len(seen) >= answered + 30, timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert {a.pid for a in seen} == pids  # no worker was replaced
    # Totals match their generation: never a mix of old and new within one answer.
    for answer in seen:
        assert answer.total == (100.0 if answer.generation == old else 110.0)
    # A worker switches once, for all its threads: no request sent after it answered with
    # the new generation gets the old one.
    switched = {
        pid: min(a.received for a in seen if a.pid == pid and a.generation == new) for pid in pids
    }
    assert [a for a in seen if a.generation == old and a.sent > switched[a.pid]] == []


class Answer(NamedTuple):
    """An answer of /test/b-total, with when its request was sent and when it came back."""

    sent: float
    received: float
    pid: int
    generation: int
    total: float


KEEPALIVE_CONF = """
import time
from initpipeline.gunicorn import keep_alive

def post_worker_init(worker):
    {body}
    print("worker init done", flush=True)
"""


def livez(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/init/livez", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.mark.parametrize(
    ("body", "times_out"),
    [
        # The old advice: notify once, then do the slow work. The watchdog starts at that
        # notify, and the worker is killed (FIELD_NOTES, Gunicorn >= 22).
        ("worker.notify(); time.sleep(6)", True),
        ("with keep_alive(worker):\n        time.sleep(6)", False),
    ],
    ids=["notify-once", "keep_alive"],
)
def test_keep_alive_survives_slow_in_worker_init(
    stack: Stack, tmp_path: Path, body: str, times_out: bool
) -> None:
    conf = tmp_path / "gunicorn_keepalive.py"
    conf.write_text(KEEPALIVE_CONF.format(body=body))
    port = free_port()
    log = tmp_path / "gunicorn.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "tests.wsgi:application",
            "-c",
            str(conf),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--timeout",
            "2",
        ],
        cwd=ROOT,
        env=stack.env,
        stdout=open(log, "wb"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        if times_out:
            # Killed in the middle of its 6 s init, 2 s after its only notify.
            wait_for(lambda: "WORKER TIMEOUT" in log.read_text(errors="replace"), timeout=60)
            assert "worker init done" not in log.read_text(errors="replace")
        else:
            # A worker answers only once its init is over: then it has lived through it.
            wait_for(lambda: livez(port), timeout=60)
            text = log.read_text(errors="replace")
            assert "WORKER TIMEOUT" not in text, text
            assert text.count("Booting worker") == 1, text
            assert "worker init done" in text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_init_processes(master: int) -> list[int]:
    """The live start_init processes under Gunicorn's master (the when_ready hook's): they
    keep the sid that start_new_session gave the master."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # After the command's name: state, ppid, pgrp, sid, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # it ended meanwhile
        if int(fields[3]) == master and fields[0] != "Z" and b"start_init" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_when_ready_hook_starts_the_init_once(stack: Stack, gunicorn: Any) -> None:
    from initpipeline.models import PipelineRun

    stack.start_worker()
    server = gunicorn("--workers", "2", env={"INITPIPELINE_START_ON_READY": "1"})
    server.wait_until_up()
    wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=60)
    # Every start_init that Gunicorn started has ended, so all it printed is in the log.
    wait_for(lambda: not start_init_processes(server.proc.pid), timeout=60)
    run = PipelineRun.objects.get()
    assert run.state == "succeeded"
    log = server.log()
    assert log.count("initpipeline: starting the init (START_ON_GUNICORN_READY)") == 1, log
    # One start_init ran: it enqueued the run; no second one attached to it or found the
    # init up to date.
    outcome = re.compile(r"run \d+ enqueued|run \d+ is already \w+; attached to it|up to date: .*")
    assert [line for line in log.splitlines() if outcome.fullmatch(line)] == [
        f"run {run.pk} enqueued"
    ]
