"""A web host and two worker hosts that share nothing but PostgreSQL, Redis and S3.

Each host is its own process tree with its own copy of the code and its own working
directory, and, where the machine allows it (root, iproute2), its own network namespace
joined to the services by a bridge that this test makes: a host reaches another host's
files only through the services. The pipeline is tests/parallelapp's (left and right side by
side, then join), so both worker hosts get work, and join reads an artifact that the other
worker host made.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from initpipeline import digests
from tests.conftest import (
    REQUIRE_SERVICES,
    ROOT,
    RedisServer,
    free_port,
    missing_service,
    wait_for,
)
from tests.servers import MotoServer, PostgresServer, ServiceUnavailable

pytestmark = [pytest.mark.slow]

HOSTS = ("web", "worker1", "worker2")
DATABASE = "test_initpipeline_var"  # tests/settings.py names it after the var folder
BUCKET = "initpipeline-hosts"


class Network:
    """One network namespace per host, joined by a bridge whose address serves the services.

    Without the rights to make namespaces, every host shares the loopback interface (the
    processes and folders stay apart), and the test says so; where
    INITPIPELINE_REQUIRE_SERVICES=1 (CI) that is a failure.
    """

    #: Networks made by this process: a namespace deleted by the test before is torn down
    #: by the kernel later (its veth with it), so names are never used twice.
    made = itertools.count()

    def __init__(self) -> None:
        n = next(Network.made)
        tag = f"{os.getpid() % 100000}{n % 10}"  # interface names: 15 characters at most
        prefix = f"10.231.{(os.getpid() + n) % 250 + 1}"
        self.bridge = f"ipbr{tag}"
        self.namespaces = {name: f"initpipeline-{tag}-{name}" for name in HOSTS}
        self.veths = {name: f"ve{tag}{i}" for i, name in enumerate(HOSTS)}
        self.addresses = {name: f"{prefix}.{i + 2}" for i, name in enumerate(HOSTS)}
        self.gateway = f"{prefix}.1"
        self.isolated = False

    def up(self) -> None:
        ip = shutil.which("ip")
        try:
            if ip is None:
                raise OSError("iproute2 (ip) is not installed")
            commands = [
                ["link", "add", self.bridge, "type", "bridge"],
                ["addr", "add", f"{self.gateway}/24", "dev", self.bridge],
                ["link", "set", self.bridge, "up"],
            ]
            for name in HOSTS:
                ns, veth = self.namespaces[name], self.veths[name]
                commands += [
                    ["netns", "add", ns],
                    ["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
                    ["link", "set", veth, "master", self.bridge, "up"],
                    ["-n", ns, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0"],
                    ["-n", ns, "link", "set", "eth0", "up"],
                    ["-n", ns, "link", "set", "lo", "up"],
                ]
            for args in commands:
                subprocess.run([ip, *args], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            self.down()
            reason = f"no network namespaces here ({detail.strip()})"
            if REQUIRE_SERVICES:
                pytest.fail(
                    f"{reason} (INITPIPELINE_REQUIRE_SERVICES=1: the hosts must not share loopback)"
                )
            warnings.warn(f"{reason}: the hosts share loopback", stacklevel=1)
            self.gateway = "127.0.0.1"
            self.addresses = dict.fromkeys(HOSTS, "127.0.0.1")
            return
        self.isolated = True

    def prefix(self, host: str) -> list[str]:
        """What runs a command on ``host``."""
        return ["ip", "netns", "exec", self.namespaces[host]] if self.isolated else []

    def down(self) -> None:
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class Host:
    """A machine of the deployment: its own copy of the code, folder and processes."""

    def __init__(self, name: str, root: Path, network: Network, env: dict[str, str]) -> None:
        self.name = name
        self.root = root
        self.code = root / "app"
        self.var = root / "var"
        self.var.mkdir(parents=True)
        self.network = network
        self.address = network.addresses[name]
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for item in ("initpipeline", "project", "tests"):
            shutil.copytree(ROOT / item, self.code / item, ignore=ignore)
        shutil.copy2(ROOT / "manage.py", self.code / "manage.py")
        self.env = {**env, "INITPIPELINE_VAR_DIR": str(self.var)}
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.network.prefix(self.name), sys.executable, *args],
            cwd=self.code,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args: str, log: str) -> Path:
        path = self.root / log
        self.procs.append(
            subprocess.Popen(
                [*self.network.prefix(self.name), sys.executable, *args],
                cwd=self.code,
                env=self.env,
                stdout=open(path, "wb"),  # noqa: SIM115 - closed with the process
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        return path

    def executions(self) -> list[str]:
        """The phases this host ran (tests/testapp/work.py writes the log)."""
        log = self.var / "executions.log"
        return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []

    def shards(self) -> list[int]:
        """The shards of squares this host ran (tests/shardapp writes the log)."""
        log = self.var / "shards.log"
        return (
            [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def get(url: str) -> tuple[int, Any]:
    """The status and the body (parsed when it is JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
            if response.headers.get_content_type() == "application/json":
                return response.status, json.loads(body)
            return response.status, body
    except urllib.error.HTTPError as err:
        return err.code, None


def start_worker(host: Host, n: int) -> subprocess.Popen[bytes]:
    """A Celery worker of one process on ``host``, once it is ready."""
    log = host.start(
        "-m", "celery", "-A", "project", "worker", "-c", "1", "-n", f"worker{n}@host{n}",
        "--without-mingle", "--without-gossip", "-l", "info",
        log="worker.log",
    )  # fmt: skip
    wait_for(lambda: b" ready." in log.read_bytes(), 60)
    return host.procs[-1]


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network()
    net.up()
    yield net
    if net.isolated:
        net.down()


@pytest.fixture
def services(network: Network, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """PostgreSQL, Redis and S3, listening on the hosts' network only."""
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        missing_service("redis-server is not installed (apt-get install redis-server)")
    started: list[Any] = []
    try:
        try:
            postgres = PostgresServer(host=network.gateway)
            moto = MotoServer(tmp_path, host=network.gateway)
        except ServiceUnavailable as exc:
            missing_service(str(exc))
        redis = RedisServer(str(redis_binary), tmp_path, host=network.gateway)
        for server in (postgres, redis, moto):
            server.start()
            started.append(server)
        import psycopg

        with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        moto.client().create_bucket(Bucket=BUCKET)
        yield {"postgres": postgres, "redis": redis, "moto": moto}
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def hosts(network: Network, services: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Host]]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env = {
        **keep,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "INITPIPELINE_TEST_PIPELINE": "hosts",
        "DATABASE_URL": services["postgres"].url(DATABASE),
        "CELERY_BROKER_URL": services["redis"].url,
        "INITPIPELINE_TEST_S3_ENDPOINT": services["moto"].url,
        "INITPIPELINE_TEST_S3_BUCKET": BUCKET,
        "PYTHONUNBUFFERED": "1",
        # The web host is reached by its address, as behind a load balancer.
        "DJANGO_ALLOWED_HOSTS": f"localhost,{network.addresses['web']}",
    }
    made = {name: Host(name, tmp_path / name, network, env) for name in HOSTS}
    yield made
    for host in made.values():
        host.stop()


def test_web_host_and_two_worker_hosts_share_only_the_services(
    network: Network, hosts: dict[str, Host]
) -> None:
    web, worker1, worker2 = hosts["web"], hosts["worker1"], hosts["worker2"]
    # Left and right each work long enough that one worker host cannot take both; so does
    # each of the two shards of squares.
    control = {"sleep": {"left": 3, "right": 3, "squares": 3}, "shards": 2}
    for host in (web, worker1, worker2):
        (host.var / "control.json").write_text(json.dumps(control))

    # The release step, on the web host: the schema, in the shared database.
    migrate = web.run("manage.py", "migrate", "--noinput")
    assert migrate.returncode == 0, migrate.stderr

    for n, host in ((1, worker1), (2, worker2)):
        start_worker(host, n)

    port = free_port()
    web_log = web.start(
        "-m", "gunicorn", "tests.wsgi:application", "-c", "project/gunicorn.conf.py",
        "--bind", f"{web.address}:{port}", "--workers", "2",
        log="gunicorn.log",
    )  # fmt: skip
    base = f"http://{web.address}:{port}"

    def up() -> bool:
        try:
            return get(base + "/init/livez")[0] == 200
        except OSError:
            return False

    wait_for(up, 30)
    assert get(base + "/init/readyz")[0] == 503

    # The deploy step, on the web host; the work happens on the worker hosts.
    started = web.run("manage.py", "start_init", "--wait")
    assert started.returncode == 0, started.stderr + (worker1.root / "worker.log").read_text()

    # Every phase ran once, spread over both worker hosts; the web host ran none.
    ran = {"worker1": worker1.executions(), "worker2": worker2.executions()}
    assert sorted(ran["worker1"] + ran["worker2"]) == ["join", "left", "right"], ran
    assert ran["worker1"] and ran["worker2"], ran
    assert web.executions() == []
    # The sharded phase ran over both worker hosts: one shard each.
    shards = {"worker1": worker1.shards(), "worker2": worker2.shards()}
    assert sorted(shards["worker1"] + shards["worker2"]) == [0, 1], shards
    assert shards["worker1"] and shards["worker2"], shards
    assert web.shards() == []

    status = web.run("manage.py", "init_status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["state"] == "ready"
    generation = data["active_generation"]["id"]
    named = {
        a["name"]: digests.name_part(a["digest"]) for a in data["active_generation"]["artifacts"]
    }

    def cached(host: Host, artifact: str) -> bool:
        """The host holds its own verified copy of the artifact (named by its digest)."""
        return any(p.name.startswith(named[artifact]) for p in (host.var / "cache").glob("*"))

    # join read the side made on the other worker host from S3, into its own cache.
    joined = "worker1" if "join" in ran["worker1"] else "worker2"
    other = "worker2" if joined == "worker1" else "worker1"
    side = next(p for p in ran[other] if p in ("left", "right"))
    assert cached(hosts[joined], f"{side}_out")
    assert not cached(hosts[other], "join_out")

    # The web host serves the new generation, read from S3 into its own cache.
    wait_for(lambda: get(base + "/init/readyz")[0] == 200, 30)
    code, body = get(base + "/test/join")
    assert code == 200, web_log.read_text()
    assert body == {"generation": generation, "sides": ["left", "right"]}
    assert cached(web, "join_out")
    # Nothing else on the web host: no artifact folder of its own, no phase scratch files.
    assert not (web.var / "artifacts").exists()


def test_a_phase_handed_back_on_one_host_resumes_on_another_from_its_checkpoint_in_s3(
    hosts: dict[str, Host], services: dict[str, Any]
) -> None:
    web, worker1, worker2 = hosts["web"], hosts["worker1"], hosts["worker2"]
    # left works 8 s in 0.1-s steps and checkpoints every 5 steps and when it hands off.
    control = {"sleep": {"left": 8}, "checkpoint": {"left": 5}, "shards": 1}
    for host in (web, worker1, worker2):
        (host.var / "control.json").write_text(json.dumps(control))
    migrate = web.run("manage.py", "migrate", "--noinput")
    assert migrate.returncode == 0, migrate.stderr

    first = start_worker(worker1, 1)
    started = web.run("manage.py", "start_init")
    assert started.returncode == 0, started.stderr

    def left_steps(host: Host) -> list[int]:
        """The steps of left's progress() calls on ``host`` (tests/testapp/work.py)."""
        log = host.var / "calls.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [int(f[4]) for f in map(str.split, lines) if f[0] == "left" and f[3] == "progress"]

    # Past two checkpoints, a rolling restart stops worker host 1 (SIGTERM to the worker).
    wait_for(lambda: any(step >= 12 for step in left_steps(worker1)), 60)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0, (worker1.root / "worker.log").read_text()
    handed = left_steps(worker1)[-1]
    assert handed < 80
    # The hand-off's checkpoint is in S3, and nowhere a worker host could share it.
    listing = (
        services["moto"]
        .client()
        .list_objects_v2(Bucket=BUCKET, Prefix="_initpipeline-checkpoints/")
    )
    saved = {Path(item["Key"]).name.split(".")[0] for item in listing.get("Contents", [])}
    assert saved
    assert not (worker1.var / "artifacts").exists()

    # Worker host 2 takes the phase over and resumes from the checkpoint it reads from S3.
    start_worker(worker2, 2)
    waited = web.run("manage.py", "start_init", "--wait", "--json")
    assert waited.returncode == 0, waited.stderr + (worker2.root / "worker.log").read_text()
    phase = {p["name"]: p for p in json.loads(waited.stdout)["run"]["phases"]}["left"]
    assert (phase["state"], phase["handoffs"], phase["attempt"]) == ("succeeded", 1, 1)
    starts = [line.split() for line in (worker2.var / "starts.log").read_text().splitlines()]
    assert [int(f[2]) for f in starts if f[0] == "left"] == [handed]
    assert left_steps(worker2)[0] == handed + 1
    assert not (worker2.var / "artifacts").exists()
    cached = {p.name.split(".")[0] for p in (worker2.var / "cache").glob("*")}
    assert cached & saved, (cached, saved)
