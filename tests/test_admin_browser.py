"""The live progress page in headless Chromium, against a live server and a real worker."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User

from initpipeline.models import PhaseRun, PipelineRun
from tests.conftest import ROOT, Stack, missing_service, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOT = ROOT / "docs" / "admin-progress.png"
OVERALL = "() => Number(document.querySelector('#ip-overall').getAttribute('aria-valuenow'))"


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        missing_service("Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_service("playwright is not installed (pip install playwright)")
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls
    # are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def log_in(browser: Any, base_url: str, **options: Any) -> Any:
    user = User.objects.create_user("ops", password="secret-pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="initpipeline",
            codename__in=["view_pipelinerun", "start_run", "cancel_run"],
        )
    )
    page = browser.new_page(viewport={"width": 1280, "height": 900}, **options)
    page.goto(f"{base_url}/admin/login/?next=/admin/")
    page.fill("#id_username", "ops")
    page.fill("#id_password", "secret-pw")
    page.click("input[type=submit]")
    page.wait_for_url(f"{base_url}/admin/")
    return page


def latest_run() -> PipelineRun:
    run = PipelineRun.objects.latest_first().first()
    assert run is not None
    return run


def test_progress_page_follows_a_run_to_its_end_without_reloading(
    stack: Stack, live_server: Any, browser: Any, tmp_path: Path
) -> None:
    stack.start_worker()
    # A first run gives the second one its history: timings to compare with and estimate from.
    stack.control(sleep={"a": 1.0, "b": 2.0, "c": 1.0})
    first = stack.manage("start_init", "--wait")
    assert first.returncode == 0, first.stderr + stack.log()
    stack.control(sleep={"a": 2.0, "b": 3.0, "c": 1.5})
    result = stack.manage("start_init", "--force")
    assert result.returncode == 0, result.stderr
    run = latest_run()

    page = log_in(browser, live_server.url)
    navigations: list[str] = []
    status_requests: list[str] = []
    page.on(
        "framenavigated",
        lambda frame: navigations.append(frame.url) if frame == page.main_frame else None,
    )
    page.on(
        "request",
        lambda request: (
            status_requests.append(request.url) if "/init/status.json" in request.url else None
        ),
    )
    url = f"{live_server.url}/admin/initpipeline/pipelinerun/progress/{run.pk}/"
    page.goto(url)
    page.evaluate("window.__loadedOnce = true")
    assert page.get_attribute("#ip-root", "data-live") == "on"
    assert page.text_content("[data-field=estimate]").startswith("about ")
    start = page.evaluate(OVERALL)
    assert start < 100

    # The overall bar moves while the run works, then the phase bars and the badge follow.
    page.wait_for_function(f"() => ({OVERALL})() > {start} && ({OVERALL})() < 100")
    middle = page.evaluate(OVERALL)
    page.wait_for_function(f"() => ({OVERALL})() > {middle}")
    page.wait_for_function(
        "() => document.querySelector('[data-field=run-state]').textContent === 'succeeded'",
        timeout=60_000,
    )
    assert page.get_attribute("#ip-overall", "aria-valuenow") == "100"
    for name in "abc":
        row = f"tr[data-phase={name}]"
        assert page.text_content(f"{row} [data-field=state]") == "succeeded"
        assert page.get_attribute(f"{row} [role=progressbar]", "aria-valuenow") == "100"
        assert page.text_content(f"{row} [data-field=duration]").endswith(" s")
    assert page.text_content("[data-field=estimate]") == "none"
    # The timeline: this run's bars and the previous run's, one per phase each.
    assert page.locator("#ip-timeline svg rect.ip-tl-bar").count() == 3
    assert page.locator("#ip-timeline svg rect.ip-tl-prev").count() == 3
    # The actions follow the state: nothing to cancel any more.
    assert page.is_hidden("form[data-when=in-flight]")
    assert page.is_visible("form[data-when=ended]")

    # No reload, no navigation: the script did all of it.
    assert navigations == [url]
    assert page.evaluate("window.__loadedOnce") is True
    assert page.url == url

    # Polling stopped with the run.
    assert page.get_attribute("#ip-root", "data-live") == "off"
    polls = len(status_requests)
    assert polls >= 2
    page.wait_for_timeout(3000)  # three poll intervals
    assert len(status_requests) == polls

    # The README's picture. Rewritten only on request (or when missing), so that running
    # the suite leaves the working tree clean.
    shot = SCREENSHOT
    if SCREENSHOT.exists() and os.environ.get("INITPIPELINE_SCREENSHOTS") != "1":
        shot = tmp_path / SCREENSHOT.name
    shot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG")

    # Dark mode: the same page in the admin's dark colours (its CSS variables).
    dark = browser.new_page(
        viewport={"width": 1280, "height": 900}, color_scheme="dark", storage_state=None
    )
    dark.context.add_cookies(page.context.cookies())
    dark.goto(url)
    badge = dark.locator("[data-field=run-state]")
    assert badge.evaluate("el => getComputedStyle(el).backgroundColor") == "rgb(0, 107, 27)"
    assert badge.evaluate("el => getComputedStyle(el).color") == "rgb(238, 238, 238)"


def test_cancel_button_stops_the_running_phase(
    stack: Stack, live_server: Any, browser: Any
) -> None:
    stack.start_worker()
    stack.control(sleep={"a": 30.0})
    assert stack.manage("start_init").returncode == 0
    run = latest_run()
    wait_for(lambda: PhaseRun.objects.filter(run=run, name="a", state="running").exists(), 60)

    page = log_in(browser, live_server.url)
    # The list polls the run in flight too.
    page.goto(f"{live_server.url}/admin/initpipeline/pipelinerun/progress/")
    assert page.get_attribute("#ip-root", "data-live") == "on"
    bar = f"tr[data-run='{run.pk}'] [role=progressbar]"
    before = int(page.get_attribute(bar, "aria-valuenow"))
    page.wait_for_function(
        f"() => Number(document.querySelector(\"{bar}\").getAttribute('aria-valuenow')) > {before}"
    )
    page.click(f"tr[data-run='{run.pk}'] a")
    url = f"{live_server.url}/admin/initpipeline/pipelinerun/progress/{run.pk}/"
    page.wait_for_url(url)
    page.click("form[data-when=in-flight] button")
    page.wait_for_url(url)
    assert page.text_content("ul.messagelist li.success") == (
        f"Run {run.pk} cancelled; its running phase stops at its next progress report or heartbeat."
    )
    assert page.text_content("[data-field=run-state]") == "cancelled"
    assert page.is_visible("form[data-when=resumable]")
    # The worker sees the cancellation at its next progress call and stops the phase.
    wait_for(lambda: f"phase a of run {run.pk} stopped: run cancelled" in stack.log(), 30)
    assert set(run.phases.values_list("state", flat=True)) == {"cancelled"}
    assert not run.artifacts.exists()


def test_resume_from_failure_reruns_from_the_failed_phase(
    stack: Stack, live_server: Any, browser: Any
) -> None:
    # The live server runs in this process: the worker must read the queue it writes to.
    options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
    stack.env["INITPIPELINE_BROKER_DIR"] = str(Path(options["data_folder_in"]).parent)
    stack.start_worker()
    stack.control(fail=["b"])
    assert stack.manage("start_init", "--wait").returncode == 1
    failed = latest_run()

    stack.control()  # b works again
    page = log_in(browser, live_server.url)
    page.goto(f"{live_server.url}/admin/initpipeline/pipelinerun/progress/{failed.pk}/")
    assert page.text_content("tr[data-error-for=b] [data-field=error]") == (
        "RuntimeError: b was told to fail"
    )
    assert page.is_hidden("tr[data-error-for=b] pre")  # the traceback is folded
    page.click("tr[data-error-for=b] summary")
    assert "Traceback (most recent call last)" in page.text_content("tr[data-error-for=b] pre")

    page.click("form[data-when=resumable] button")
    page.wait_for_url(lambda url: not url.endswith(f"/progress/{failed.pk}/"))
    resumed = latest_run()
    assert resumed.pk != failed.pk
    assert page.url == f"{live_server.url}/admin/initpipeline/pipelinerun/progress/{resumed.pk}/"
    assert page.text_content("ul.messagelist li.success") == (
        f"Run {resumed.pk} started: 2 phases to run. 1 phase is cached."
    )
    page.wait_for_function(
        "() => document.querySelector('[data-field=run-state]').textContent === 'succeeded'",
        timeout=60_000,
    )
    states = [page.text_content(f"tr[data-phase={n}] [data-field=state]") for n in "abc"]
    assert states == ["cached", "succeeded", "succeeded"]
    assert resumed.trigger == f"admin: resume run {failed.pk} by ops"


def test_progress_page_shows_each_shard_and_a_lane_for_each(
    stack: Stack, live_server: Any, browser: Any, tmp_path: Path
) -> None:
    sharded = {"INITPIPELINE_TEST_PIPELINE": "shards"}
    stack.env.update(sharded)
    stack.control(sleep={"squares": 2.0})
    stack.start_worker()
    stack.start_worker()
    # A first run, for the second to be compared with.
    result = stack.manage("start_init", "--wait", timeout=120)
    assert result.returncode == 0, result.stderr
    result = stack.manage("start_init", "--force")
    assert result.returncode == 0, result.stderr
    run = latest_run()
    page = log_in(browser, live_server.url)
    # While a run is in flight, the list offers no second one.
    page.goto(f"{live_server.url}/admin/initpipeline/pipelinerun/progress/")
    if latest_run().is_in_flight:
        assert page.locator("text=Run the pipeline again").is_hidden()
    page.goto(f"{live_server.url}/admin/initpipeline/pipelinerun/progress/{run.pk}/")
    # Each shard has its row under its phase, and the rows follow the run to its end.
    for i in range(4):
        assert page.get_attribute(f'tr[data-phase="squares#{i}"]', "class") == "ip-shard"
    page.wait_for_function(
        "() => document.querySelector('[data-field=run-state]').textContent === 'succeeded'",
        timeout=60_000,
    )
    for name in ["numbers", "squares", "total", *(f"squares#{i}" for i in range(4))]:
        row = f'tr[data-phase="{name}"]'
        assert page.text_content(f"{row} [data-field=state]") == "succeeded", name
        assert page.get_attribute(f"{row} [role=progressbar]", "aria-valuenow") == "100"
    # The timeline: a lane per phase and per shard.
    assert page.locator("#ip-timeline svg rect.ip-tl-bar").count() == 3 + 4
    # Every lane's name is whole: none starts left of the chart ("ollect_docstrings#0").
    lefts = page.eval_on_selector_all(
        "#ip-timeline text.ip-tl-name", "els => els.map(e => e.getBBox().x)"
    )
    assert len(lefts) == 7 and min(lefts) >= 0, lefts
    # The earlier run's lane of the sharded phase spans its shards, not its merge alone.
    prev = page.eval_on_selector_all(
        "#ip-timeline rect.ip-tl-prev",
        "els => Object.fromEntries(els.map(e => [e.dataset.phase, [+e.getAttribute('x'),"
        " +e.getAttribute('width')]]))",
    )
    first_shard = min(prev[f"squares#{i}"][0] for i in range(4))
    assert prev["squares"][0] <= first_shard + 1, prev
    last_end = max(x + w for name, (x, w) in prev.items() if name.startswith("squares#"))
    assert prev["squares"][0] + prev["squares"][1] >= last_end, prev
    # The legend's items stand apart.
    boxes = page.eval_on_selector_all(
        ".ip-legend-item", "els => els.map(e => e.getBoundingClientRect().toJSON())"
    )
    assert len(boxes) == 2 and boxes[0]["right"] + 8 <= boxes[1]["left"], boxes
    shot = ROOT / "docs" / "admin-shards.png"
    if shot.exists() and os.environ.get("INITPIPELINE_SCREENSHOTS") != "1":
        shot = tmp_path / shot.name
    page.wait_for_timeout(1000)  # the bars' CSS transitions, for the picture
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")
    # With nothing in flight, the list offers a new run again.
    page.goto(f"{live_server.url}/admin/initpipeline/pipelinerun/progress/")
    assert page.locator("text=Run the pipeline again").is_visible()
