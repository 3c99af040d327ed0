"""The bench's process harness: environments, background processes, Gunicorn, workers, Redis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import (
    PostgresServer,
    RedisServer,
    ServiceUnavailable,
    celery_worker,
    kill_group,
    spawn,
    wait_for,
    wait_worker_ready,
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
VAR = ROOT / "var" / "bench"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


BLAS_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Env:
    """What the bench's processes run with: the workload's size, the broker, extra variables."""

    files: int
    broker_url: str = "filesystem://"
    extra: dict[str, str] = field(default_factory=dict)
    settings: str = "bench.settings"
    var: Path = VAR

    def vars(self) -> dict[str, str]:
        env = {
            # One BLAS thread per process (unless the environment says otherwise), for the
            # plain process, the peers and the worker alike. The demo's SVD otherwise runs
            # two spinning threads on this 2-core machine, and beside a busy web server
            # they fight for the cores: compute_lsa took 0.5 s alone and 4.5-19.6 s while
            # wrk hammered the site (README, Benchmarks).
            **BLAS_THREADS,
            **os.environ,
            "DJANGO_SETTINGS_MODULE": self.settings,
            "INITPIPELINE_VAR_DIR": str(self.var),
            "CELERY_BROKER_URL": self.broker_url,
            "SEARCH_MAX_DOCS": str(self.files),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT),
            **self.extra,
        }
        return env


class Proc:
    """A background process in its own process group, logging to a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], name: str) -> None:
        VAR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = VAR.parent / f"bench-{name}.log"
        self.proc = spawn(cmd, env, self.log_path, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        kill_group(self.proc)


@contextmanager
def running(cmd: list[str], env: dict[str, str], name: str) -> Iterator[Proc]:
    proc = Proc(cmd, env, name)
    try:
        yield proc
    finally:
        proc.stop()


def manage(env: Env, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "manage.py", *args],
        cwd=ROOT,
        env=env.vars(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compile_bytecode(*folders: Path) -> None:
    """Compile the modules of folders to bytecode, as `pip install` does for a package.

    A process with PYTHONDONTWRITEBYTECODE=1 (this machine's environment, and many a
    Dockerfile's) would otherwise compile initpipeline's source at every start, and the
    start-up figures would count it.
    """
    subprocess.run(
        [PY, "-m", "compileall", "-q", *map(str, folders)], check=True, stdout=subprocess.DEVNULL
    )


def reset(env: Env) -> None:
    """A new database and no artifacts: nothing is cached."""
    shutil.rmtree(env.var, ignore_errors=True)
    env.var.mkdir(parents=True)
    result = manage(env, "migrate", "--noinput")
    if result.returncode:
        raise SystemExit(f"migrate failed:\n{result.stderr}")


def gunicorn_cmd(app: str, port: int, workers: int, *extra: str) -> list[str]:
    return [
        PY,
        "-m",
        "gunicorn",
        app,
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        "gthread",
        "--threads",
        "4",
        "--timeout",
        "600",
        "--access-logfile",
        "/dev/null",
        *extra,
    ]


def wait_http(
    url: str, proc: Proc, timeout: float, ok: Callable[[int], bool], interval: float = 0.005
) -> float:
    """Seconds until url answers with a status ok() accepts, polled every interval seconds."""
    start = time.monotonic()

    def answered() -> bool:
        if proc.proc.poll() is not None:
            raise SystemExit(f"process exited early:\n{proc.log()[-3000:]}")
        try:
            return ok(http_get(url, timeout=2)[0])
        except OSError:
            return False

    try:
        wait_for(answered, timeout, interval)
    except AssertionError:
        raise SystemExit(f"{url} not ready after {timeout} s:\n{proc.log()[-3000:]}") from None
    return time.monotonic() - start


def run_failure(env: Env) -> str:
    """What `init_status --json` says about the latest run: its error and its failed phases'."""
    result = manage(env, "init_status", "--json", timeout=120)
    try:
        run = json.loads(result.stdout)["run"] or {}
    except ValueError:
        return f"init_status said: {result.stdout[-1000:]}{result.stderr[-1000:]}"
    lines = [f"run {run.get('id')} is {run.get('state')}: {run.get('error') or 'no error'}"]
    for phase in run.get("phases", []):
        if phase["state"] == "failed":
            lines.append(f"{phase['name']}: {(phase['error'] or '')[-1500:]}")
    return "\n".join(lines)


def wait_ready(
    port: int, env: Env, procs: list[Proc], timeout: float = 3600, interval: float = 0.1
) -> float:
    """Seconds until /init/readyz answers 200, polled every interval seconds.

    Stops at once, with the reason, when a phase of the run failed (readyz reports it) or
    one of procs (the web server, the worker) exited: a failed run never turns ready, and
    waiting for it would take the whole timeout.
    """
    url = f"http://127.0.0.1:{port}/init/readyz"
    start = time.monotonic()

    def answered() -> bool:
        for proc in procs:
            if proc.proc.poll() is not None:
                raise SystemExit(
                    f"{proc.name} exited while waiting for readyz:\n{proc.log()[-3000:]}"
                )
        try:
            code, body = http_get(url, timeout=2)
        except OSError:
            return False
        if code == 200:
            return True
        try:
            checks = json.loads(body).get("checks", {})
        except ValueError:
            return False
        failed = [
            name[len("phase:") :]
            for name, entries in checks.items()
            if name.startswith("phase:") and entries and entries[0].get("status") == "fail"
        ]
        if failed:
            raise SystemExit(
                f"the run failed ({', '.join(failed)}), so it will never be ready:\n"
                f"{run_failure(env)}"
            )
        return False

    try:
        wait_for(answered, timeout, interval)
    except AssertionError:
        raise SystemExit(f"{url} not ready after {timeout} s:\n{run_failure(env)}") from None
    return time.monotonic() - start


@contextmanager
def worker(env: Env, name: str = "worker") -> Iterator[Proc]:
    """One celery worker process (-c 1) for env, once it is ready."""
    with running(celery_worker(), env.vars(), name) as proc:
        try:
            wait_worker_ready(proc.proc, proc.log_path)
        except AssertionError as exc:
            raise SystemExit(str(exc)) from None
        yield proc


@contextmanager
def redis_server() -> Iterator[str | None]:
    """The URL of a throwaway redis-server on loopback, or None when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        log("redis-server not found: the Redis figures are skipped")
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        server = RedisServer(binary, Path(workdir))
        try:
            server.start()
            yield server.url
        finally:
            server.stop()


@contextmanager
def postgres_server() -> Iterator[str | None]:
    """The DATABASE_URL of a throwaway PostgreSQL server on loopback, or None when none is
    installed (tests/servers.PostgresServer)."""
    try:
        server = PostgresServer()
    except ServiceUnavailable as exc:
        log(f"PostgreSQL unavailable ({exc}): SQLite instead")
        yield None
        return
    try:
        server.start()
        yield server.url()
    finally:
        server.stop()


def run_module(module: str, env: Env, *args: str, timeout: float = 1800) -> Any:
    """``python -m module args`` with env's variables: the JSON of its last stdout line;
    SystemExit with its stderr when it fails."""
    result = subprocess.run(
        [PY, "-m", module, *args],
        cwd=ROOT,
        env=env.vars(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
