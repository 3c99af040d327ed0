"""A production install, checked for real: the demo on Redis, then on RabbitMQ.

``make test-install`` makes a fresh venv with requirements.txt and the project only (no
test tools, which bring in packages such as ``packaging`` that a production host would
lack), then runs this module with that venv's Python::

    python -m tests.install_check [redis] [rabbitmq]

For each broker it starts a throwaway server (tests/servers.py), migrates a fresh SQLite
database, starts a real ``celery worker`` and runs ``manage.py start_init --wait`` on a
small demo workload, then ``init_status``. Any step that fails prints its output and the
worker's log, and the exit code is 1. Standard library and tests/servers.py only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.servers import (
    RabbitMQServer,
    RedisServer,
    ServiceUnavailable,
    celery_worker,
    kill_group,
    spawn,
    wait_worker_ready,
)

ROOT = Path(__file__).resolve().parent.parent
BROKERS = ("redis", "rabbitmq")
# The demo on a few hundred files of the standard library only (scale below 1): every
# phase runs, in seconds, on the same corpus whatever else the venv holds.
DEMO = {"SEARCH_SCALE": "0.5", "SEARCH_MAX_DOCS": "300"}


class CheckFailed(Exception):
    """A step failed; the message says which, with its output."""


def manage(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run manage.py with this venv's Python; return its output, or raise CheckFailed."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise CheckFailed(f"manage.py {' '.join(args)} exited {result.returncode}:\n{output}")
    return output


def run_demo(broker: str, url: str, tmp: Path) -> str:
    """migrate, a worker, start_init --wait and init_status against the broker at url;
    return init_status's first line."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("INITPIPELINE_", "DJANGO_", "CELERY_", "AWS_"))
        and key not in ("DATABASE_URL", "PYTHONPATH")
    }
    env |= {
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "INITPIPELINE_VAR_DIR": str(tmp / f"var-{broker}"),
        "CELERY_BROKER_URL": url,
        **DEMO,
        "PYTHONUNBUFFERED": "1",
        "NO_COLOR": "1",
    }
    manage(env, "migrate", "--noinput", "-v", "0")
    log = tmp / f"worker-{broker}.log"
    worker = spawn(celery_worker("-n", f"install-{broker}@%h"), env, log, cwd=ROOT)
    try:
        try:
            wait_worker_ready(worker, log)
            manage(env, "start_init", "--wait")
            return manage(env, "init_status").splitlines()[0]
        except (AssertionError, CheckFailed) as exc:
            raise CheckFailed(
                f"{exc}\n--- worker log ({broker}) ---\n{log.read_text(errors='replace')[-6000:]}"
            ) from None
    finally:
        kill_group(worker)


def check(broker: str, tmp: Path) -> str:
    workdir = tmp / broker
    workdir.mkdir()
    server: RedisServer | RabbitMQServer
    if broker == "redis":
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceUnavailable("redis-server is not installed")
        server = RedisServer(binary, workdir)
    else:
        server = RabbitMQServer(workdir)
    server.start()
    try:
        return run_demo(broker, server.url, tmp)
    finally:
        server.stop()


def main(argv: list[str]) -> int:
    brokers = argv or list(BROKERS)
    unknown = set(brokers) - set(BROKERS)
    if unknown:
        print(f"usage: python -m tests.install_check [{'] ['.join(BROKERS)}]", file=sys.stderr)
        return 2
    print(f"Python {sys.version.split()[0]} at {sys.prefix}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="initpipeline-install-"))
    failed = 0
    try:
        for broker in brokers:
            started = time.monotonic()
            try:
                status = check(broker, tmp)
            except (CheckFailed, ServiceUnavailable, RuntimeError, AssertionError) as exc:
                failed += 1
                print(f"FAILED {broker}: {exc}", flush=True)
            else:
                took = time.monotonic() - started
                print(f"ok {broker} ({took:.0f} s): start_init --wait, then {status}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
