"""A real Gunicorn, a real worker: the site answers at once and switches generations live."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    boot = server.wait_until_up()
    assert boot < 10, server.log()
    stack.start_worker()
    stack.control(sleep={"a": 12, "b": 12, "c": 8})
    assert stack.manage("start_init").returncode == 0

    started = time.monotonic()
    ready_codes: list[int] = []
    while time.monotonic() - started < 120:
        t0 = time.monotonic()
        status, _, _ = server.get("/init/livez", timeout=2)
        assert status == 200
        assert time.monotonic() - t0 < 1.0
        code, headers, body = server.get("/init/readyz")
        ready_codes.append(code)
        if code == 200:
            break
        assert code == 503, body
        assert headers["Retry-After"] == "1"
        assert json.loads(body)["status"] == "fail"
        page, page_headers, _ = server.get("/test/b-total", Accept="application/json")
        assert page == 503 and page_headers["Cache-Control"] == "no-store"
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

    seen: list[tuple[float, int, int, float]] = []  # time, pid, generation, total
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                code, _, body = server.get("/test/b-total", timeout=5)
            except OSError as exc:
                failures.append(repr(exc))
                continue
            if code != 200:
                failures.append(f"{code}: {body[:200]!r}")
                continue
            data = json.loads(body)
            seen.append((time.monotonic(), data["pid"], data["generation"], data["total"]))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len({pid for _, pid, _, _ in seen}) == 2, timeout=30)
        stack.control(versions={"b": "2"})
        assert stack.manage("start_init", "--wait").returncode == 0
        new = Generation.objects.get(is_active=True)
        activated = time.monotonic()
        assert new.pk != old

        def all_switched() -> bool:
            recent = [s for s in seen if s[0] > activated + 1.0]
            pids = {pid for _, pid, _, _ in recent}
            return len(pids) == 2 and all(g == new.pk for _, _, g, _ in recent)

        wait_for(all_switched, timeout=15)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    # Totals match their generation: never a mix of old and new within one answer.
    for _, _, gen, total in seen:
        assert total == (100.0 if gen == old else 110.0)
    # REFRESH_INTERVAL is 0.5 s in the tests: no worker served the old one much later.
    late = [s for s in seen if s[2] == old and s[0] > activated + 2.0]
    assert late == []


KEEPALIVE_CONF = """
import time
from initpipeline.gunicorn import keep_alive

def post_worker_init(worker):
    {body}
"""


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
        time.sleep(9)
        text = log.read_text(errors="replace")
        assert ("WORKER TIMEOUT" in text) is times_out, text
        if not times_out:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/init/livez", timeout=5) as r:
                assert r.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_when_ready_hook_starts_the_init_once(stack: Stack, gunicorn: Any) -> None:
    from initpipeline.models import PipelineRun

    stack.start_worker()
    server = gunicorn("--workers", "2", env={"INITPIPELINE_START_ON_READY": "1"})
    server.wait_until_up()
    wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=60)
    assert PipelineRun.objects.count() == 1
    assert PipelineRun.objects.get().state == "succeeded"
    assert "starting the init (START_ON_GUNICORN_READY)" in server.log()
