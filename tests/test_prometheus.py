"""The alert rules under promtool, and a real Prometheus scraping a live stack: Gunicorn (two
workers, prometheus-client's multiprocess mode), a Celery worker and a real run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from initpipeline.models import Generation, PipelineRun
from tests.conftest import ROOT, Stack, missing_service, wait_for
from tests.servers import PrometheusServer, ServiceUnavailable
from tests.test_gunicorn import Gunicorn

RULES = ROOT / "deploy" / "prometheus"
TOKEN = "prometheus-scrapes-with-this-token"
SCREENSHOT = ROOT / "docs" / "prometheus-progress.png"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing_service("promtool is not installed (apt-get install prometheus)")
    return str(found)


def test_the_alert_rules_are_valid() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", "initpipeline.rules.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def alert_names() -> list[str]:
    rules = (RULES / "initpipeline.rules.yml").read_text()
    return [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]


def test_each_alert_fires_on_its_series_and_no_other() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", "initpipeline.rules.test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert of the rules file has a test, and a row in the README's table.
    tests = (RULES / "initpipeline.rules.test.yml").read_text()
    alerts = alert_names()
    assert all(f"alertname: {name}" in tests for name in alerts)
    readme = (ROOT / "README.md").read_text()
    assert re.findall(r"^\| `(InitPipeline\w+)` \|", readme, flags=re.MULTILINE) == alerts


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    started: list[PrometheusServer] = []

    def start(targets: list[str]) -> PrometheusServer:
        try:
            server = PrometheusServer(tmp_path / "prometheus", targets, token=TOKEN)
        except ServiceUnavailable as exc:
            missing_service(f"{exc} (apt-get install prometheus)")
        started.append(server)
        server.start()
        return server

    (tmp_path / "prometheus").mkdir()
    yield start
    for server in started:
        server.stop()


def values(server: PrometheusServer, expr: str) -> list[float]:
    """The samples Prometheus holds of one series over the last 5 minutes, oldest first."""
    found = server.query(f"{expr}[5m]")
    assert len(found) == 1, found
    return [float(v) for _, v in found[0]["values"]]


@pytest.mark.slow
def test_prometheus_scrapes_a_live_stack_through_a_run(
    stack: Stack, prometheus: Any, tmp_path: Path
) -> None:
    shots = os.environ.get("INITPIPELINE_SCREENSHOTS") == "1"
    # b reports its progress for 4 s (40 steps), long enough for a few 1-s scrapes.
    stack.control(sleep={"b": 20.0 if shots else 4.0})
    multiproc = tmp_path / "metrics"
    web = Gunicorn(
        stack,
        "--workers",
        "2",
        env={
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
            "INITPIPELINE_TEST_SETTINGS": json.dumps({"METRICS_TOKEN": TOKEN}),
        },
    )
    try:
        web.wait_until_up()
        stack.start_worker()
        server = prometheus([f"127.0.0.1:{web.port}"])
        # Up, and not ready: no run yet.
        wait_for(lambda: server.query('up{job="initpipeline"} == 1'), timeout=30)
        wait_for(lambda: server.query("initpipeline_ready == 0"), timeout=30)

        assert stack.manage("start_init").returncode == 0
        run = stack.ended(PipelineRun.objects.get(), timeout=60)
        assert run.state == "succeeded", run.error
        generation = Generation.objects.get(is_active=True)
        # Both workers load the new generation; Prometheus scrapes that too.
        wait_for(lambda: web.get("/init/readyz")[0] == 200, timeout=30, log=web.log_path)
        wait_for(lambda: server.query("initpipeline_ready == 1"), timeout=30)
        wait_for(
            lambda: len(server.query(f"initpipeline_serving_generation == {generation.pk}")) == 2,
            timeout=30,
            log=web.log_path,
        )
        if shots:
            screenshot(server)

        assert [r["value"][1] for r in server.query('up{job="initpipeline"}')] == ["1"]
        # b's progress moved during the run: Prometheus saw it part-way, then done.
        progress = values(server, 'initpipeline_phase_progress_ratio{phase="b"}')
        assert any(0 < v < 1 for v in progress), progress
        assert progress[-1] == 1.0
        assert progress == sorted(progress)
        # Readiness went from 0 to 1 and stayed there.
        ready = values(server, "initpipeline_ready")
        assert ready[0] == 0.0 and ready[-1] == 1.0
        assert ready == sorted(ready)
        assert values(server, 'initpipeline_run_state{state="succeeded"}')[-1] == 1.0
        # One scrape reached one worker, and counted the loads of both (multiprocess mode):
        # each loaded the required artifact once.
        loads = server.query('initpipeline_artifact_load_duration_seconds_count{artifact="b_out"}')
        assert [r["value"][1] for r in loads] == ["2"]
        serving = server.query("initpipeline_serving_generation")
        assert sorted(r["metric"]["pid"] for r in serving) == sorted(
            str(pid) for pid in worker_pids(web)
        )
        # Each worker says it is ready (as its readyz would), and loads nothing now.
        ready = server.query("initpipeline_serving_ready == 1")
        assert sorted(r["metric"]["pid"] for r in ready) == sorted(
            str(pid) for pid in worker_pids(web)
        )
        loading = server.query('initpipeline_artifact_loading{artifact="b_out"}')
        assert [r["value"][1] for r in loading] == ["0"]
        # No web process is behind the active generation.
        behind = server.query(
            "initpipeline_serving_generation < on (job, instance) group_left () "
            "initpipeline_active_generation_id"
        )
        assert behind == []
    finally:
        web.stop()


def worker_pids(web: Gunicorn) -> list[int]:
    children = Path(f"/proc/{web.proc.pid}/task/{web.proc.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def screenshot(server: PrometheusServer) -> None:
    """The README's picture: Prometheus's graph of each phase's progress during the run."""
    from playwright.sync_api import sync_playwright

    from tests.test_admin_browser import CHROMIUM_ARGS

    # Debian's package serves the classic UI (its build leaves the React one out).
    url = (
        f"{server.url}/classic/graph?g0.expr=initpipeline_phase_progress_ratio&g0.tab=0"
        "&g0.range_input=40s"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1280, "height": 880})
        page.goto(url)
        page.wait_for_function("document.body.innerText.includes('phase=\"b\"')", timeout=30_000)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        browser.close()
