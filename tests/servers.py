"""Throwaway servers (Redis, PostgreSQL, RabbitMQ, S3) and worker processes on loopback.

The process helpers of the tests, CI and the benchmarks (bench/harness.py imports them,
so nothing here imports pytest). The fixtures in conftest.py start the servers once per
test session. A whole suite on PostgreSQL needs the server before pytest starts, because
pytest-django reads DATABASES before any fixture runs; for that:

    python -m tests.servers postgres -- pytest tests/test_pipeline_integration.py

starts a server, runs the command with DATABASE_URL pointing at it, and stops the server
when the command ends (its exit code is the command's).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ServiceUnavailable(Exception):
    """The server cannot run here (not installed, no user to run it as)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30,
    interval: float = 0.1,
    *,
    what: str = "condition not met",
    log: Path | None = None,
) -> Any:
    """Call predicate every interval seconds until it returns a true value, and return that.

    After timeout seconds, raise AssertionError: "<what> within <timeout> s", followed by
    the end of log when one is given.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = "\n" + log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what} within {timeout} s{tail}")
        time.sleep(interval)


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _binary(name: str, *patterns: str) -> str:
    found = shutil.which(name)
    if found is None:
        found = next(iter(sorted(p for pat in patterns for p in glob.glob(pat))), None)
    if found is None:
        raise ServiceUnavailable(f"{name} is not installed")
    return found


def spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start cmd in a session of its own (kill_group stops its children too), output to log."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a spawn()ed process and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def celery_worker(*args: str, concurrency: int = 1) -> list[str]:
    """The command of a worker of project/celery.py (run it from the project's root)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "project",
        "worker",
        "-l",
        "info",
        "-c",
        str(concurrency),
        *args,
        "--without-mingle",
        "--without-gossip",
    ]


def wait_worker_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Return once the worker logging to log says it is ready; AssertionError if it exits
    or is not ready within timeout seconds."""
    wait_for(
        lambda: b" ready." in log.read_bytes() or proc.poll() is not None,
        timeout,
        what="worker did not start",
        log=log,
    )
    if proc.poll() is not None:
        raise AssertionError(
            f"worker exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
        )


class SilentServer(threading.Thread):
    """Accepts TCP connections on loopback and never answers: a broker that hangs."""

    def __init__(self) -> None:
        super().__init__(name="silent-server", daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class RedisServer:
    """A redis-server on HOST and a free port, with no persistence (workdir is its --dir)."""

    def __init__(self, binary: str, workdir: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                # Bound to one address of the test's own (network namespace) network.
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, timeout=10)

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def flush(self) -> None:
        with socket.create_connection((self.host, self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(16).startswith(b"+OK")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


class PostgresServer:
    """A PostgreSQL cluster made by initdb in a temp folder, serving HOST:PORT (loopback).

    PostgreSQL refuses to run as root: as root, the cluster belongs to the ``postgres``
    user (the Debian package creates it) and its commands run through ``runuser``.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.initdb = _binary("initdb", "/usr/lib/postgresql/*/bin/initdb")
        self.pg_ctl = str(Path(self.initdb).with_name("pg_ctl"))
        self.as_user: list[str] = []
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceUnavailable("running as root, and there is no postgres user") from None
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.user = self.owner.pw_name if self.owner else pwd.getpwuid(os.geteuid()).pw_name
        # Not under pytest's tmp folder: that one is private to root, and the server
        # runs as the postgres user.
        self.dir = Path(tempfile.mkdtemp(prefix="initpipeline-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.started = False

    def url(self, database: str = "initpipeline") -> str:
        return f"postgres://{self.user}@{self.host}:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=120, cwd=self.dir
        )
        if result.returncode:
            raise RuntimeError(f"{' '.join(args[:2])} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        if self.owner is not None:
            os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)
        # trust on loopback only: a throwaway cluster for the tests, nothing to protect.
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-E", "UTF8", "--no-sync")
        if self.host != "127.0.0.1":
            # The test's own private network (tests/test_hosts.py), nothing else on it.
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.host}/24 trust\n")
        options = (
            f"-h {self.host} -p {self.port} -k {self.dir} "
            # Durability buys nothing in a test cluster and costs fsyncs on every commit.
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )
        self.started = True

    def stop(self) -> None:
        if self.started:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitMQServer:
    """A RabbitMQ node with its own name, ports, data and Erlang port mapper (epmd).

    Its config sets ``consumer_timeout`` above the longest phase: RabbitMQ (3.8.15+) closes
    the channel of a consumer that holds a delivery unacknowledged longer than that (30
    minutes by default), and with ``task_acks_late`` a phase's message stays unacked for
    the whole phase.
    """

    # Six hours, like the Redis visibility_timeout of initpipeline/celery_settings.py.
    CONSUMER_TIMEOUT_MS = 6 * 3600 * 1000

    def __init__(self, workdir: Path) -> None:
        self.binary = _binary("rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server")
        # Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user and its fixed
        # folders; the script it wraps honours the RABBITMQ_* variables below.
        direct = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        if direct.exists():
            self.binary = str(direct)
        self.epmd = shutil.which("epmd")
        self.workdir = workdir
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.log = workdir / "rabbitmq.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        config = self.workdir / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {self.CONSUMER_TIMEOUT_MS}\n"
        )
        plugins = self.workdir / "enabled_plugins"
        plugins.write_text("[].\n")  # No management plugin: nothing else to listen on.
        env = {
            **os.environ,
            # The Erlang cookie is created in $HOME.
            "HOME": str(self.workdir),
            "RABBITMQ_NODENAME": f"initpipeline-test-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            # Defaults to NODE_PORT + 20000, which may not be a port at all.
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_LOGS": "-",
        }
        self.proc = proc = spawn([self.binary], env, self.log, cwd=self.workdir)
        wait_for(
            lambda: b"Server startup complete" in self.log.read_bytes() or proc.poll() is not None,
            120,
            what="rabbitmq-server did not start",
            log=self.log,
        )
        if proc.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited:\n{self.log.read_text(errors='replace')}")

    def purge(self) -> None:
        """Drop the messages a previous test left in Celery's default queue."""
        from amqp.exceptions import NotFound
        from kombu import Connection

        # NotFound: no worker declared the queue yet, so there is nothing to drop.
        with Connection(self.url, connect_timeout=5) as conn, contextlib.suppress(NotFound):
            conn.default_channel.queue_purge("celery")

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
            self.proc = None
        if self.epmd:
            # The node started a daemonized epmd on our private port; ask it to leave.
            subprocess.run(
                [self.epmd, "-kill"],
                env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)},
                capture_output=True,
                timeout=10,
            )


class MotoServer:
    """moto's S3 (and friends) in server mode: ``moto_server -H HOST -p PORT``."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        binary = Path(sys.executable).with_name("moto_server")
        if not binary.exists():
            raise ServiceUnavailable("moto_server is not installed (pip install 'moto[server]')")
        self.binary = str(binary)
        self.port = free_port()
        self.log = workdir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-H", self.host, "-p", str(self.port)],
            stdout=open(self.log, "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: _listening(self.port, self.host),
            30,
            what="moto_server did not start",
            log=self.log,
        )

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


class PrometheusServer:
    """Debian's ``prometheus`` on a free loopback port, scraping ``targets`` (host:port) at
    ``metrics_path`` every ``interval`` with a bearer token; its data in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        *,
        metrics_path: str = "/init/metrics",
        token: str | None = None,
        interval: str = "1s",
    ) -> None:
        self.binary = _binary("prometheus")
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "prometheus.log"
        auth = f"    authorization: {{credentials: '{token}'}}\n" if token else ""
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global: {scrape_interval: " + interval + ", evaluation_interval: " + interval + "}\n"
            "scrape_configs:\n"
            "  - job_name: initpipeline\n"
            f"    metrics_path: {metrics_path}\n"
            f"{auth}"
            f"    static_configs: [{{targets: {targets!r}}}]\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = proc = spawn(
            [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            dict(os.environ),
            self.log,
            cwd=self.workdir,
        )
        wait_for(
            lambda: self._ready() or proc.poll() is not None,
            60,
            what="prometheus did not start",
            log=self.log,
        )
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{self.log.read_text(errors='replace')}")

    def _ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query (``data.result`` of the HTTP API)."""
        import json
        import urllib.parse
        import urllib.request

        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None


def main(argv: list[str]) -> int:
    if "--" not in argv or argv[: argv.index("--")] != ["postgres"]:
        print("usage: python -m tests.servers postgres -- COMMAND ...", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1 :]
    server = PostgresServer()
    started = time.monotonic()
    server.start()
    url = server.url()
    print(f"PostgreSQL at {url} (started in {time.monotonic() - started:.1f} s)", flush=True)
    try:
        return subprocess.call(command, env={**os.environ, "DATABASE_URL": url})
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
