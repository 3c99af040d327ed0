"""The deploy recipes of docs/deploy.md: Procfile, systemd units, Kubernetes manifests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.test import Client

from initpipeline import conf
from tests.conftest import ROOT, missing_service

DEPLOY = ROOT / "deploy"


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object in deploy/k8s, by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = obj["spec"]["template"]["spec"]["containers"]
    return dict(only)


def test_procfile_is_valid_for_honcho() -> None:
    honcho = Path(sys.executable).with_name("honcho")
    result = subprocess.run(
        [str(honcho), "check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Valid procfile detected (release, web, worker)" in result.stderr


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing_service("systemd-analyze is not installed (apt-get install systemd)")
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert [u.name for u in units] == [
        "myapp-release.service",
        "myapp-web.service",
        "myapp-worker.service",
    ]
    # verify also checks that every ExecStart program exists: point them at the programs
    # beside this interpreter (its venv, wherever the checkout keeps it) and at this checkout.
    bin_dir = str(Path(sys.executable).parent)
    for unit in units:
        text = unit.read_text().replace("/srv/myapp/.venv/bin", bin_dir)
        (tmp_path / unit.name).write_text(text.replace("/srv/myapp", str(ROOT)))
    result = subprocess.run(
        [analyze, "verify", *(u.name for u in units)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_kubernetes_manifests_hold_the_documented_objects() -> None:
    assert sorted(manifests()) == [
        ("Deployment", "myapp-web"),
        ("Deployment", "myapp-worker"),
        ("Job", "myapp-migrate"),
        ("Job", "myapp-start-init"),
        ("Service", "myapp-web"),
    ]
    images = {container(o)["image"] for o in manifests().values() if o["kind"] != "Service"}
    assert len(images) == 1


def test_web_probes_use_livez_and_readyz_with_an_allowed_host(client: Client) -> None:
    web = container(manifests()[("Deployment", "myapp-web")])
    probes = {k: web[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    paths = {k: p["httpGet"]["path"] for k, p in probes.items()}
    assert paths == {
        "startupProbe": "/init/livez",
        "livenessProbe": "/init/livez",
        "readinessProbe": "/init/readyz",
    }
    hosts = {h["value"] for p in probes.values() for h in p["httpGet"]["httpHeaders"]}
    assert hosts == {"localhost"}
    assert client.get("/init/livez", HTTP_HOST="localhost").status_code == 200
    # What the probes would get without the header: the kubelet sends the pod IP.
    assert client.get("/init/livez", HTTP_HOST="10.1.2.3:8000").status_code == 400
    assert {e["name"]: e["value"] for e in web["env"]}["GUNICORN_BIND"] == "0.0.0.0:8000"


def test_worker_grace_period_covers_the_hand_off() -> None:
    worker = manifests()[("Deployment", "myapp-worker")]
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # A running phase hands itself back within HANDOFF_GRACE; then the worker exits. The
    # grace must not wait out an hour-long phase (a rollout would stall behind it).
    assert conf.DEFAULTS["HANDOFF_GRACE"] + 20 <= grace < 120
    spec = container(worker)
    assert spec["command"][:4] == ["celery", "-A", "project", "worker"]
    assert "livenessProbe" not in spec


def test_release_jobs_migrate_before_and_start_init_after_the_new_pods() -> None:
    objects = manifests()
    migrate = objects[("Job", "myapp-migrate")]
    start = objects[("Job", "myapp-start-init")]
    assert container(migrate)["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert container(start)["command"] == ["python", "manage.py", "start_init"]
    assert migrate["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert start["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    for job in (migrate, start):
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("unit", ["myapp-web.service", "myapp-worker.service"])
def test_systemd_stops_only_the_main_process_first(unit: str) -> None:
    # KillMode=mixed: SIGTERM to Gunicorn's master / Celery's main process, which stop
    # their children gracefully; the default would signal the children directly.
    assert "KillMode=mixed" in (DEPLOY / "systemd" / unit).read_text().splitlines()
