"""Upgrading from the release before BLAKE3 digests (migration 0009), with its own code.

The previous release (its tree, from git) migrates a database, runs tests/testapp's
pipeline with a worker of its own and verifies what it published; then this release
migrates the same database and must find every artifact cached and sound, without
building or hashing anything again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT, missing_service, wait_for
from tests.servers import celery_worker, kill_group, spawn, wait_worker_ready

pytestmark = [pytest.mark.slow]

#: The last commit before this release's digests: what a deployment upgrades from.
PREVIOUS_RELEASE = "8570b49"

#: Run by this release: each artifact of the active generation loads, with hashing made
#: impossible: the records the previous release's processes left on this host must hold.
LOAD_WITHOUT_HASHING = """
import django
django.setup()
from initpipeline import digests, loading, storage

def refuse(*args):
    raise AssertionError(f"hashed {args}")

storage.file_digest = digests.of_file = refuse
names = sorted(loading.active.refresh().records)
print({name: type(loading.artifact(name).get()).__name__ for name in names})
"""


#: Run by the previous release, as one of its web processes: it serves c_out, lives through
#: the upgrade and looks at the database again once this release activated a generation.
PREVIOUS_WEB = """
import json, sys, time
from pathlib import Path
import django
django.setup()
from initpipeline import loading
handle = loading.artifact("c_out")
first = handle.get()
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.05)
loading.active.refresh()
print(json.dumps({"generation": handle.generation, "same": handle.get() == first}))
"""


FAILED_CHECKS = """
from initpipeline.models import Artifact
print(list(Artifact.objects.exclude(failed_check="").values_list("name", "failed_check")))
"""


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """The previous release's tree (manage.py, project, initpipeline, tests)."""
    tree = tmp_path / "previous"
    tree.mkdir()
    paths = ["manage.py", "project", "initpipeline", "tests"]
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, *paths],
        capture_output=True,
        timeout=60,
    )
    if archive.returncode:
        missing_service(
            f"the previous release's tree (git archive {PREVIOUS_RELEASE}): "
            f"{archive.stderr.decode(errors='replace').strip()}"
        )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


@contextmanager
def previous_web(
    tree: Path, env: dict[str, str], ready: Path, go: Path
) -> Iterator[subprocess.Popen[str]]:
    """PREVIOUS_WEB in the previous release's tree, once it serves; stopped at the end."""
    web = subprocess.Popen(
        [sys.executable, "-c", PREVIOUS_WEB, str(ready), str(go)],
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: ready.exists() or web.poll() is not None, timeout=60)
        yield web
    finally:
        go.touch()
        if web.poll() is None:
            web.kill()
            web.wait()


def test_what_the_previous_release_published_stays_cached_and_verified(
    previous: Path, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        upgrade(previous, tmp_path, stack)


def upgrade(previous: Path, tmp_path: Path, stack: ExitStack) -> None:
    var = tmp_path / "var"
    var.mkdir()
    # a's artifact is a signed pickle: its host record names the key that verified it.
    (var / "control.json").write_text(json.dumps({"pickle": ["a"]}))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "INITPIPELINE_VAR_DIR": str(var),
        "INITPIPELINE_BROKER_DIR": str(tmp_path / "broker"),
        "CELERY_BROKER_URL": "filesystem://",
        "PYTHONUNBUFFERED": "1",
    }
    # A database file of its own (SQLite beside var/), on whatever leg the suite runs, and
    # this host's records under var/cache, as both releases' tests/settings.py place them.
    for name in ("DATABASE_URL", "INITPIPELINE_TEST_CACHE_DIR", "INITPIPELINE_TEST_PIPELINE"):
        env.pop(name, None)

    def manage(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{tree.name}: manage.py {args}:\n{result.stderr}"
        return result

    # The previous release deploys: its schema, its worker, its run.
    manage(previous, "migrate", "--noinput")
    log = tmp_path / "worker.log"
    worker = spawn(celery_worker("-n", "previous@%h"), env, log, cwd=previous)
    try:
        wait_worker_ready(worker, log)
        manage(previous, "start_init", "--wait")
    finally:
        kill_group(worker)
    before = json.loads(manage(previous, "init_status", "--json").stdout)
    records = var / "cache" / "verified"
    # What this host verified, as the previous release recorded it: a file hashed again
    # would get its record written anew.
    verified = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in records.iterdir()}
    assert len(verified) == 3
    published = {a["name"]: a["sha256"] for a in before["active_generation"]["artifacts"]}
    assert sorted(published) == ["a_out", "b_out", "c_out"]

    # A web process of the previous release, serving, lives through the upgrade.
    go = tmp_path / "web-go"
    web = stack.enter_context(previous_web(previous, env, tmp_path / "web-ready", go))

    # This release: its migration, then the plan of the next deploy.
    manage(ROOT, "migrate", "--noinput")
    plan = manage(ROOT, "start_init", "--dry-run")
    generation = before["active_generation"]["id"]
    assert plan.stdout.splitlines() == [
        "a  cached  unchanged",
        "b  cached  unchanged",
        "c  cached  unchanged",
        f"up to date: generation {generation} is active",
    ]
    after = json.loads(manage(ROOT, "init_status", "--json").stdout)
    assert after["state"] == "ready"
    assert {a["name"]: a["digest"] for a in after["active_generation"]["artifacts"]} == {
        name: f"sha256:{hexdigest}" for name, hexdigest in published.items()
    }
    loaded = manage(ROOT, "shell", "-c", LOAD_WITHOUT_HASHING)
    assert loaded.stdout.splitlines()[-1] == "{'a_out': 'dict', 'b_out': 'memmap', 'c_out': 'dict'}"
    deploy = manage(ROOT, "start_init")
    assert deploy.stdout.startswith(f"up to date: generation {generation}"), deploy.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in records.iterdir()} == verified

    # Mixed fleet: this release's worker builds a new generation (c again, in BLAKE3)...
    (var / "control.json").write_text(json.dumps({"pickle": ["a"], "versions": {"c": "2"}}))
    log = tmp_path / "current-worker.log"
    worker = spawn(celery_worker("-n", "current@%h"), env, log, cwd=ROOT)
    try:
        wait_worker_ready(worker, log)
        manage(ROOT, "start_init", "--wait")
    finally:
        kill_group(worker)
    newer = json.loads(manage(ROOT, "init_status", "--json").stdout)["active_generation"]
    assert newer["id"] != generation
    c_out = {a["name"]: a["digest"] for a in newer["artifacts"]}["c_out"]
    assert c_out.startswith("blake3:")
    # ...which the previous release's web process cannot read (the column it reads is
    # renamed): it keeps serving what it loaded, and judges nothing.
    go.touch()
    out, err = web.communicate(timeout=60)
    assert web.returncode == 0, err
    assert json.loads(out) == {"generation": generation, "same": True}
    assert "cannot read the active generation" in err
    failed = manage(ROOT, "shell", "-c", FAILED_CHECKS).stdout.splitlines()[-1]
    assert failed == "[]"
