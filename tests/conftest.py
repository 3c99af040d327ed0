"""Fixtures that run the real parts: celery worker and CLI subprocesses, redis-server,
PostgreSQL, RabbitMQ and an S3 server (moto)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from django.conf import settings

# The project's Celery app, as a worker loads it: tests read and patch celery.current_app.
# (Web processes import it only when they send a task: project/__init__.py.)
import project.celery  # noqa: F401
from tests.servers import (
    MotoServer,
    PostgresServer,
    RabbitMQServer,
    RedisServer,
    ServiceUnavailable,
    celery_worker,
    kill_group,
    spawn,
    wait_worker_ready,
)

# The process helpers live in tests/servers.py, which the benchmarks share; the tests
# import these two from here.
from tests.servers import free_port as free_port
from tests.servers import wait_for as wait_for

ROOT = Path(__file__).resolve().parent.parent

# CI sets this: a service the tests need but cannot find is then a failure, not a skip.
REQUIRE_SERVICES = os.environ.get("INITPIPELINE_REQUIRE_SERVICES") == "1"


def missing_service(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} (INITPIPELINE_REQUIRE_SERVICES=1 turns this skip into a failure)")
    pytest.skip(what)


@pytest.fixture(scope="session", autouse=True)
def _clean_var() -> None:
    var = Path(os.environ["INITPIPELINE_VAR_DIR"])
    shutil.rmtree(var, ignore_errors=True)
    var.mkdir(parents=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        missing_service("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


class Stack:
    """The processes of one deployment: a broker, worker subprocesses and CLI calls."""

    def __init__(self, broker: str, tmp: Path, redis: RedisServer | None) -> None:
        self.broker = broker
        self.tmp = tmp
        self.redis = redis
        self.var = Path(os.environ["INITPIPELINE_VAR_DIR"])
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "INITPIPELINE_BROKER_DIR": str(tmp / "broker"),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("NO_COLOR", None)
        if broker == "redis":
            assert redis is not None
            redis.flush()
            self.env["CELERY_BROKER_URL"] = redis.url
        else:
            self.env["CELERY_BROKER_URL"] = "filesystem://localhost/"
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_logs: list[Path] = []

    def control(self, **values: Any) -> None:
        """Write tests/testapp's control file (versions, fail, sleep, hold...).

        Replaced whole, never rewritten in place: a held phase reads it while it changes.
        """
        scratch = self.var / "control.json.new"
        scratch.write_text(json.dumps(values))
        os.replace(scratch, self.var / "control.json")

    def manage(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``manage.py *args``; on a timeout, AssertionError with what the command printed
        and every worker's log (a hung command alone says nothing of why)."""
        try:
            return subprocess.run(
                [sys.executable, str(ROOT / "manage.py"), *args],
                cwd=ROOT,
                env={**self.env, **(env or {})},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as timed_out:
            printed = [
                out.decode(errors="replace") if isinstance(out, bytes) else out or ""
                for out in (timed_out.stdout, timed_out.stderr)
            ]
            logs = "\n\n".join(f"--- worker {n}\n{self.log(n)}" for n in range(len(self.workers)))
            raise AssertionError(
                f"manage.py {' '.join(args)} still running after {timeout:.0f} s\n"
                f"--- stdout\n{printed[0]}\n--- stderr\n{printed[1]}\n{logs}"
            ) from None

    def start_worker(
        self, concurrency: int = 1, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> str:
        """Start worker subprocess n (args: more options, such as -Q); returns its name,
        which PhaseRun.worker records for the phases it runs."""
        n = len(self.workers)
        log = self.tmp / f"worker{n}.log"
        cmd = celery_worker("-n", f"test{n}@%h", *args, concurrency=concurrency)
        proc = spawn(cmd, {**self.env, **(env or {})}, log, cwd=ROOT)
        # Listed before the wait, so that teardown stops a worker that never got ready.
        self.workers.append(proc)
        self.worker_logs.append(log)
        wait_worker_ready(proc, log)
        return f"test{n}@{socket.gethostname()}"

    def log(self, n: int = 0) -> str:
        return self.worker_logs[n].read_text(errors="replace")

    def ended(self, run: Any, timeout: float = 120) -> Any:
        """``run`` (a PipelineRun), refreshed once it is no longer in flight; on a timeout,
        AssertionError with every worker's log."""

        def done() -> bool:
            run.refresh_from_db()
            return not run.is_in_flight

        try:
            wait_for(done, timeout=timeout, interval=0.2)
        except AssertionError:
            logs = "\n\n".join(self.log(n) for n in range(len(self.workers)))
            raise AssertionError(logs) from None
        return run

    def executions(self, run_id: int) -> list[tuple[str, int]]:
        """(phase, attempt) of every time a phase of the run really started, in order."""
        path = self.var / "executions.log"
        rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
        return [(r[0], int(r[2])) for r in rows if int(r[1]) == run_id]

    def calls(self, run_id: int) -> list[Call]:
        """The progress() and heartbeat() calls of the run's phases, in order."""
        path = self.var / "calls.log"
        rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
        return [
            Call(r[0], int(r[2]), r[3], int(r[4]), datetime.fromtimestamp(float(r[5]), UTC))
            for r in rows
            if int(r[1]) == run_id
        ]

    def stop_workers(self) -> None:
        # Teardown only: an idle worker's warm shutdown takes seconds on these transports,
        # and nothing here is under test any more.
        for proc in self.workers:
            kill_group(proc)


class Call(NamedTuple):
    """A progress() or heartbeat() call of a tests/testapp phase (its calls.log)."""

    phase: str
    attempt: int
    kind: str
    step: int
    at: datetime


# The broker of tests that do not name one; a CI leg sets it to run them all on Redis or
# RabbitMQ too.
DEFAULT_BROKER = os.environ.get("INITPIPELINE_TEST_BROKER", "filesystem")


def brokers(*names: str) -> pytest.MarkDecorator:
    """Run the test on a stack of each of these brokers, and of DEFAULT_BROKER: the CI leg
    that sets INITPIPELINE_TEST_BROKER=rabbitmq (-k rabbitmq) runs it on RabbitMQ too."""
    chosen = [*names, *([] if DEFAULT_BROKER in names else [DEFAULT_BROKER])]
    return pytest.mark.parametrize("stack", chosen, indirect=True)


@pytest.fixture(params=[DEFAULT_BROKER])
def stack(
    request: pytest.FixtureRequest, transactional_db: None, tmp_path: Path
) -> Iterator[Stack]:
    """A deployment on the broker named by the parameter ("filesystem", "redis" or
    "rabbitmq")."""
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    s = Stack(request.param, tmp_path, redis)
    if request.param == "rabbitmq":
        rabbitmq = request.getfixturevalue("rabbitmq_server")
        rabbitmq.purge()
        s.env["CELERY_BROKER_URL"] = rabbitmq.url
    s.control()
    # Those of earlier tests, whose run ids a fresh database may hand out again.
    for name in ("executions.log", "calls.log"):
        (s.var / name).unlink(missing_ok=True)
    yield s
    s.stop_workers()
    (s.var / "control.json").unlink(missing_ok=True)


@pytest.fixture
def artifacts_dir() -> Path:
    return Path(settings.STORAGES["initpipeline"]["OPTIONS"]["location"])


# -- PostgreSQL, RabbitMQ and S3 (tests/servers.py) ---------------------------------------


def _serve(make: Callable[[], Any], what: str) -> Iterator[Any]:
    """Start a server of tests/servers.py for the session; skip (or fail) when unavailable."""
    try:
        server = make()
    except ServiceUnavailable as exc:
        missing_service(f"{what}: {exc}")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this session (initdb in a temp folder, a free loopback port)."""
    yield from _serve(PostgresServer, "PostgreSQL (apt-get install postgresql)")


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    """A RabbitMQ node of this session, with a consumer_timeout fit for long phases."""
    yield from _serve(
        lambda: RabbitMQServer(tmp_path_factory.mktemp("rabbitmq")),
        "RabbitMQ (apt-get install rabbitmq-server)",
    )


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 in server mode, reachable from worker subprocesses."""
    yield from _serve(lambda: MotoServer(tmp_path_factory.mktemp("moto")), "S3")


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[str]]]:
    """What dispatch.py would send to the broker (run id and chain), instead of sending it."""
    from initpipeline import dispatch

    calls: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(
        dispatch,
        "send_chains",
        lambda run_id, chains: calls.extend((run_id, list(names)) for names in chains),
    )
    monkeypatch.setattr(dispatch, "send_finish", lambda run_id: calls.append((run_id, ["finish"])))
    return calls
