"""The admin's live progress pages and actions, through Django's test client."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.http import HttpResponse
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from pytest_django.asserts import assertContains, assertNotContains

from initpipeline.models import PhaseRun, PipelineRun
from initpipeline.registry import get_pipeline
from tests.records import T0, Phase, make_run
from tests.servers import SilentServer

pytestmark = [pytest.mark.django_db]

LIST = "admin:initpipeline_pipelinerun_progress"
RUN = "admin:initpipeline_pipelinerun_progress_run"
RUN_AGAIN = "admin:initpipeline_pipelinerun_run_again"
RESUME = "admin:initpipeline_pipelinerun_resume"
CANCEL = "admin:initpipeline_pipelinerun_cancel"

UserFactory = Callable[..., Client]


@pytest.fixture
def login(client: Client) -> UserFactory:
    """Log a staff user with the given permission codenames into ``client``."""

    def make(*codenames: str, name: str = "ops") -> Client:
        user = User.objects.create_user(name, password="pw", is_staff=True)
        user.user_permissions.set(
            Permission.objects.filter(
                content_type__app_label="initpipeline", codename__in=codenames
            )
        )
        client.force_login(user)
        return client

    return make


def messages_of(response: HttpResponse) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]  # type: ignore[attr-defined]


def failed_run() -> PipelineRun:
    return make_run(
        "failed",
        [
            Phase("a", start=0, took=1.5),
            Phase(
                "b",
                "failed",
                reason="code changed",
                start=1.5,
                took=0.5,
                done=3,
                total=10,
                message="step 3 of 10",
                error="RuntimeError: b was told to fail",
                traceback='Traceback (most recent call last):\n  File "x.py", line 1\n'
                "RuntimeError: b was told to fail\n",
            ),
            Phase("c", "upstream_failed", message="not run: b failed"),
        ],
        error="phase b failed: RuntimeError: b was told to fail",
        trigger="start_init",
    )


def running_run() -> PipelineRun:
    """A run in flight whose worker is alive: b's heartbeat is fresh."""
    run = make_run(
        "running",
        [
            Phase("a", "cached", message="cached: fingerprint matches a verified artifact"),
            Phase("b", "running", start=0, took=None, done=4, total=10, message="step 4 of 10"),
            Phase("c", "pending"),
        ],
        at=T0.replace(hour=11),
        trigger="admin: run again by ops",
    )
    # Recovery (run by services.start and status) would take over a phase whose heartbeat
    # is stale.
    run.phases.filter(state="running").update(heartbeat_at=timezone.now())
    return run


# -- who may see and do what --------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize("name", [LIST, RUN, RUN_AGAIN, RESUME, CANCEL])
def test_anonymous_users_are_sent_to_the_admin_login(
    client: Client, name: str, method: str
) -> None:
    run = failed_run()
    url = reverse(name) if name in (LIST, RUN_AGAIN) else reverse(name, args=[run.pk])
    response = getattr(client, method)(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:login')}?next={url}"
    assert PipelineRun.objects.count() == 1


@pytest.mark.parametrize("name", [LIST, RUN])
def test_staff_without_the_view_permission_get_403_on_the_pages(
    login: UserFactory, name: str
) -> None:
    run = failed_run()
    client = login()
    url = reverse(name) if name == LIST else reverse(name, args=[run.pk])
    assert client.get(url).status_code == 403


@pytest.mark.parametrize(
    ("name", "granted"),
    [
        (RUN_AGAIN, ["view_pipelinerun", "cancel_run"]),
        (RESUME, ["view_pipelinerun", "cancel_run"]),
        (CANCEL, ["view_pipelinerun", "start_run"]),
    ],
)
def test_staff_without_the_action_permission_get_403(
    login: UserFactory, name: str, granted: list[str]
) -> None:
    failed = failed_run()
    running = running_run()
    client = login(*granted)
    if name == RUN_AGAIN:
        url = reverse(name)
    else:
        url = reverse(name, args=[failed.pk if name == RESUME else running.pk])
    assert client.post(url).status_code == 403
    assert PipelineRun.objects.count() == 2
    running.refresh_from_db()
    assert running.state == "running"


@pytest.mark.parametrize("name", [RUN_AGAIN, RESUME, CANCEL])
def test_actions_refuse_get(login: UserFactory, name: str) -> None:
    run = failed_run()
    client = login("view_pipelinerun", "start_run", "cancel_run")
    url = reverse(name) if name == RUN_AGAIN else reverse(name, args=[run.pk])
    response = client.get(url)
    assert response.status_code == 405
    assert response["Allow"] == "POST"


def test_actions_need_the_csrf_token(login: UserFactory) -> None:
    run = running_run()
    client = login("view_pipelinerun", "cancel_run")
    csrf_client = Client(enforce_csrf_checks=True)
    csrf_client.cookies = client.cookies
    response = csrf_client.post(reverse(CANCEL, args=[run.pk]))
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.state == "running"


def test_status_json_is_403_without_the_view_permission(client: Client, login: UserFactory) -> None:
    make_run("succeeded", [Phase("a", start=0, took=1)])
    url = reverse("initpipeline:status")
    assert client.get(url).status_code == 403
    assert login().get(url).status_code == 403


def test_status_json_carries_the_estimate(login: UserFactory) -> None:
    make_run("succeeded", [Phase("a", start=0, took=2), Phase("b", start=2, took=3)])
    run = make_run(
        "running",
        [Phase("a", "cached"), Phase("b", "pending")],
        at=T0.replace(hour=12),
    )
    response = login("view_pipelinerun").get(f"{reverse('initpipeline:status')}?run={run.pk}")
    assert response.status_code == 200
    data = response.json()
    assert data["run"]["id"] == run.pk
    assert data["run"]["estimate_remaining"] == 3.0


# -- the pages ------------------------------------------------------------------------------


def test_progress_list_shows_badges_bars_durations_and_triggers(login: UserFactory) -> None:
    failed = failed_run()
    running = running_run()
    response = login("view_pipelinerun").get(reverse(LIST))
    assert response.status_code == 200
    assertContains(response, "<h1>Live progress</h1>", html=True)
    assertContains(
        response,
        '<span class="ip-badge ip-state-failed" data-field="state">failed</span>',
        html=True,
    )
    assertContains(
        response,
        '<span class="ip-badge ip-state-running" data-field="state">running</span>',
        html=True,
    )
    # Overall progress: failed run (1 + 0.3 + 0) / 3, running run (1 + 0.4 + 0) / 3.
    assertContains(
        response,
        f'<div class="ip-bar ip-bar-failed" role="progressbar" aria-label="Progress of run '
        f'{failed.pk}" aria-valuemin="0" aria-valuemax="100" aria-valuenow="43">'
        '<span style="width: 43%"></span></div>',
        html=True,
    )
    assertContains(
        response,
        f'<div class="ip-bar" role="progressbar" aria-label="Progress of run {running.pk}" '
        'aria-valuemin="0" aria-valuemax="100" aria-valuenow="47">'
        '<span style="width: 47%"></span></div>',
        html=True,
    )
    assertContains(response, '<td data-field="duration">2.0 s</td>', html=True)
    assertContains(response, "<td>admin: run again by ops</td>", html=True)
    # Only the run in flight is polled.
    status = reverse("initpipeline:status")
    assertContains(response, f'data-status-url="{status}?run={running.pk}"', count=1)
    assertContains(response, "initpipeline/admin/progress.js")
    # Newest first.
    content = response.content.decode()
    assert content.index(f'data-run="{running.pk}"') < content.index(f'data-run="{failed.pk}"')
    # A viewer cannot start runs: no button.
    assertNotContains(response, "Run the pipeline again")


def test_run_page_shows_every_phase_with_its_error_and_folded_traceback(
    login: UserFactory,
) -> None:
    run = failed_run()
    response = login("view_pipelinerun").get(reverse(RUN, args=[run.pk]))
    assert response.status_code == 200
    assertContains(response, f"<h1>Run {run.pk}</h1>", html=True)
    assertContains(
        response,
        '<span class="ip-badge ip-state-failed" data-field="run-state">failed</span>',
        html=True,
    )
    assertContains(
        response,
        '<span class="ip-badge ip-state-upstream_failed" data-field="state">upstream failed</span>',
        html=True,
    )
    assertContains(
        response,
        '<div class="ip-bar ip-bar-failed" role="progressbar" aria-label="Progress of b" '
        'aria-valuemin="0" aria-valuemax="100" aria-valuenow="30">'
        '<span style="width: 30%"></span></div>',
        html=True,
    )
    assertContains(response, '<td data-field="message" class="ip-message">step 3 of 10</td>')
    assertContains(response, '<td data-field="reason" class="ip-reason">code changed</td>')
    # Phases with no reason on record (planned before reasons were kept) show "-".
    assertContains(response, '<td data-field="reason" class="ip-reason">-</td>', count=2)
    assertContains(response, '<td data-field="attempt">1/1</td>', html=True)
    assertContains(
        response,
        '<td data-field="started"><time datetime="2025-03-04T10:00:01.500000+00:00">'
        "10:00:01</time></td>",
        html=True,
    )
    assertContains(response, '<td data-field="duration">0.5 s</td>', html=True)
    assertContains(
        response,
        '<p class="ip-error" data-field="error">RuntimeError: b was told to fail</p>',
        html=True,
    )
    assertContains(
        response,
        '<details data-field="traceback-box"><summary>Traceback</summary>'
        '<pre data-field="traceback">Traceback (most recent call last):\n  File "x.py", '
        "line 1\nRuntimeError: b was told to fail\n</pre></details>",
        html=True,
    )
    assertContains(
        response,
        '<p class="errornote" data-field="run-error">'
        "phase b failed: RuntimeError: b was told to fail</p>",
        html=True,
    )
    assertContains(response, '<dd data-field="run-duration">2.0 s</dd>', html=True)
    assertContains(response, '<dd data-field="estimate">none</dd>', html=True)
    assertContains(response, "No earlier successful run to compare with.")
    # The run has ended: nothing to poll.
    assertNotContains(response, "data-status-url")
    data = json.loads(
        re.search(
            r'<script id="ip-run-data" type="application/json">(.*?)</script>',
            response.content.decode(),
        ).group(1)  # type: ignore[union-attr]
    )
    assert [p["state"] for p in data["phases"]] == ["succeeded", "failed", "upstream_failed"]


def test_run_page_of_a_run_in_flight_polls_and_estimates(login: UserFactory) -> None:
    earlier = make_run(
        "succeeded",
        [Phase("a", start=0, took=5), Phase("b", start=5, took=20), Phase("c", start=25, took=6)],
    )
    run = running_run()
    client = login("view_pipelinerun", "start_run", "cancel_run")
    response = client.get(reverse(RUN, args=[run.pk]))
    status = reverse("initpipeline:status")
    assertContains(response, f'data-status-url="{status}?run={run.pk}"')
    # b started at 11:00:00 (long ago): history says 20 s, its pace says 1.5 x elapsed.
    assertContains(response, "about ")
    assertContains(
        response,
        f'<a href="{reverse(RUN, args=[earlier.pk])}">Run {earlier.pk}</a>',
        html=True,
    )
    previous = json.loads(
        re.search(
            r'<script id="ip-previous" type="application/json">(.*?)</script>',
            response.content.decode(),
        ).group(1)  # type: ignore[union-attr]
    )
    assert previous == {
        "id": earlier.pk,
        "duration": 31.0,
        "spans": [
            {"name": "a", "state": "succeeded", "offset": 0.0, "duration": 5.0},
            {"name": "b", "state": "succeeded", "offset": 5.0, "duration": 20.0},
            {"name": "c", "state": "succeeded", "offset": 25.0, "duration": 6.0},
        ],
    }
    # The buttons the state allows are shown, the others are there but hidden.
    content = response.content.decode()
    assert re.search(r'action="[^"]*/cancel/" class="ip-action" data-when="in-flight">', content)
    assert re.search(
        r'action="[^"]*/resume/" class="ip-action" data-when="resumable" hidden>', content
    )
    assert re.search(
        r'action="[^"]*/run-again/" class="ip-action" data-when="ended" hidden>', content
    )
    forms = r'class="ip-action"[^>]*><input type="hidden" name="csrfmiddlewaretoken"'
    assert len(re.findall(forms, content)) == 3


def test_run_page_404_for_an_unknown_run(login: UserFactory) -> None:
    assert login("view_pipelinerun").get(reverse(RUN, args=[999])).status_code == 404


def test_changelist_links_to_live_progress(login: UserFactory) -> None:
    run = failed_run()
    client = login("view_pipelinerun")
    response = client.get(reverse("admin:initpipeline_pipelinerun_changelist"))
    assertContains(
        response,
        f'<a href="{reverse(LIST)}" class="viewlink">Live progress</a>',
        html=True,
    )
    assertContains(response, f'<a href="{reverse(RUN, args=[run.pk])}">watch</a>', html=True)
    # Without cancel_run there is no action, so no checkboxes either.
    assertNotContains(response, 'name="action"')
    change = client.get(reverse("admin:initpipeline_pipelinerun_change", args=[run.pk]))
    assertContains(
        change,
        f'<a href="{reverse(RUN, args=[run.pk])}" class="viewlink">Live progress</a>',
        html=True,
    )


def test_run_records_stay_read_only(login: UserFactory) -> None:
    run = failed_run()
    client = login("view_pipelinerun", "start_run", "cancel_run")
    response = client.get(reverse("admin:initpipeline_pipelinerun_change", args=[run.pk]))
    assert response.status_code == 200
    assertNotContains(response, 'name="_save"')
    assert client.get(reverse("admin:initpipeline_pipelinerun_add")).status_code == 403
    delete = reverse("admin:initpipeline_pipelinerun_delete", args=[run.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403


# -- the actions ----------------------------------------------------------------------------


def test_cancel_stops_a_run_in_flight_and_says_so(login: UserFactory) -> None:
    run = running_run()
    client = login("view_pipelinerun", "cancel_run")
    response = client.post(reverse(CANCEL, args=[run.pk]))
    assert response.status_code == 302
    assert response["Location"] == reverse(RUN, args=[run.pk])
    assert messages_of(response) == [
        (
            "success",
            f"Run {run.pk} cancelled; its running phase stops at its next progress report "
            "or heartbeat.",
        )
    ]
    run.refresh_from_db()
    assert run.state == "cancelled"
    assert set(run.phases.values_list("state", flat=True)) == {"cached", "cancelled"}


def test_cancel_of_an_ended_run_changes_nothing(login: UserFactory) -> None:
    run = failed_run()
    response = login("view_pipelinerun", "cancel_run").post(reverse(CANCEL, args=[run.pk]))
    assert messages_of(response) == [
        ("warning", f"Run {run.pk} is failed: there is nothing to cancel.")
    ]
    run.refresh_from_db()
    assert run.state == "failed"


def test_run_again_starts_a_forced_run(login: UserFactory) -> None:
    make_run("succeeded", [Phase("a", start=0, took=1)])
    client = login("view_pipelinerun", "start_run")
    response = client.post(reverse(RUN_AGAIN))
    run = PipelineRun.objects.latest_first().first()
    assert run is not None
    assert response.status_code == 302
    assert response["Location"] == reverse(RUN, args=[run.pk])
    assert messages_of(response) == [("success", f"Run {run.pk} started: 3 phases to run.")]
    assert run.state == "pending"
    assert run.trigger == "admin: run again by ops"
    assert run.options == {"force": True, "from": None, "only": []}
    assert list(run.phases.values_list("name", "state")) == [
        ("a", "pending"),
        ("b", "pending"),
        ("c", "pending"),
    ]


def test_run_again_while_a_run_is_in_flight_attaches_to_it(login: UserFactory) -> None:
    running = running_run()
    # Planned with the code that runs now (a run planned with other code makes way).
    for name, fingerprint in get_pipeline().fingerprints().items():
        running.phases.filter(name=name).update(fingerprint=fingerprint)
    response = login("view_pipelinerun", "start_run").post(reverse(RUN_AGAIN))
    assert response["Location"] == reverse(RUN, args=[running.pk])
    assert messages_of(response) == [
        (
            "warning",
            f"Run {running.pk} is already in flight: follow it here, or cancel it first.",
        )
    ]
    assert PipelineRun.objects.count() == 1


def test_resume_refuses_a_run_that_did_not_fail(login: UserFactory) -> None:
    run = make_run("succeeded", [Phase("a", start=0, took=1)])
    response = login("view_pipelinerun", "start_run").post(reverse(RESUME, args=[run.pk]))
    assert response["Location"] == reverse(RUN, args=[run.pk])
    assert messages_of(response) == [
        (
            "warning",
            f"Run {run.pk} is succeeded: only a failed or cancelled run can be resumed.",
        )
    ]
    assert PipelineRun.objects.count() == 1


def test_resume_starts_a_run_that_is_not_forced(login: UserFactory) -> None:
    failed = failed_run()
    response = login("view_pipelinerun", "start_run").post(reverse(RESUME, args=[failed.pk]))
    run = PipelineRun.objects.latest_first().first()
    assert run is not None and run.pk != failed.pk
    assert response["Location"] == reverse(RUN, args=[run.pk])
    assert run.trigger == f"admin: resume run {failed.pk} by ops"
    assert run.options == {"force": False, "from": None, "only": []}


def test_changelist_action_cancels_the_selected_runs_in_flight(login: UserFactory) -> None:
    failed = failed_run()
    running = running_run()
    client = login("view_pipelinerun", "cancel_run")
    changelist = reverse("admin:initpipeline_pipelinerun_changelist")
    response = client.post(
        changelist,
        {"action": "cancel_runs", "_selected_action": [failed.pk, running.pk]},
    )
    assert response.status_code == 302
    assert messages_of(response) == [
        ("success", "1 run cancelled; its running phase stops at its next heartbeat.")
    ]
    running.refresh_from_db()
    assert running.state == "cancelled"
    client.get(response["Location"])  # shows, and so consumes, the message

    response = client.post(changelist, {"action": "cancel_runs", "_selected_action": [failed.pk]})
    assert messages_of(response) == [("warning", "None of the selected runs was in flight.")]


def test_changelist_action_needs_cancel_run(login: UserFactory) -> None:
    running = running_run()
    client = login("view_pipelinerun")
    changelist = reverse("admin:initpipeline_pipelinerun_changelist")
    client.post(changelist, {"action": "cancel_runs", "_selected_action": [running.pk]})
    running.refresh_from_db()
    assert running.state == "running"
    assert PhaseRun.objects.filter(state="cancelled").count() == 0


@pytest.mark.django_db(transaction=True)
def test_run_again_against_a_broker_that_never_answers_fails_with_a_message(
    login: UserFactory,
) -> None:
    from celery import current_app

    silent = SilentServer()
    silent.start()
    saved = current_app.conf.broker_url, current_app.conf.broker_transport
    current_app.conf.broker_url = f"redis://127.0.0.1:{silent.port}/0"
    # The filesystem broker's transport setting would win over the URL (checks' E032).
    current_app.conf.broker_transport = None
    try:
        # Autocommit, as in production: the run's tasks are sent as start() commits.
        with override_settings(INITPIPELINE={**settings.INITPIPELINE, "SEND_TIMEOUT": 1.0}):
            response = login("view_pipelinerun", "start_run").post(reverse(RUN_AGAIN))
    finally:
        current_app.conf.broker_url, current_app.conf.broker_transport = saved
        silent.stop()
    run = PipelineRun.objects.get()
    assert run.state == "cancelled"  # the web request ended, and no run is left pending
    assert response.status_code == 302
    [(level, text)] = messages_of(response)
    assert level == "error"
    assert text.startswith(
        "The pipeline did not start: could not send the run's tasks to the broker: "
        "OperationalError: "
    )


def test_resume_a_cancelled_run(login: UserFactory) -> None:
    cancelled = make_run("cancelled", [Phase("a", start=0, took=1), Phase("b", "cancelled")])
    response = login("view_pipelinerun", "start_run").post(reverse(RESUME, args=[cancelled.pk]))
    run = PipelineRun.objects.latest_first().first()
    assert run is not None and run.pk != cancelled.pk
    assert response["Location"] == reverse(RUN, args=[run.pk])
    assert run.trigger == f"admin: resume run {cancelled.pk} by ops"
    assert run.state == "pending"


def test_progress_list_shows_which_generation_each_web_process_serves(
    login: UserFactory,
) -> None:
    from tests.records import make_generation, web_process

    gen = make_generation(failed_run(), [("model", "json", 10)])
    web_process(11, gen)
    web_process(12, None, failures={"model": {"error": "OSError: disk", "attempts": 2}})
    response = login("view_pipelinerun").get(reverse(LIST))
    assertContains(
        response, f'<td data-field="serves">generation {gen.pk}</td>', html=True, count=1
    )
    assertContains(response, '<td data-field="serves">nothing yet</td>', html=True)
    assertContains(
        response,
        '<td data-field="failures"><div class="ip-error">model: 2 attempts: OSError: disk</div>'
        "</td>",
        html=True,
    )


@pytest.mark.parametrize("model", ["phaserun", "artifact", "generation", "webprocess"])
def test_the_records_pages_follow_the_one_rule_for_details(login: UserFactory, model: str) -> None:
    """A phase's message, error and traceback, an artifact's failed check, a web process's
    failed loads: for those who may see the init's details, not for any model viewer."""
    failed_run()
    url = reverse(f"admin:initpipeline_{model}_changelist")
    assert login(f"view_{model}").get(url).status_code == 403
    Client().logout()
    viewer = login(f"view_{model}", "view_pipelinerun", name="viewer")
    assert viewer.get(url).status_code == 200
