"""The probes and /init/status.json: expected 503s are not errors, bad input is a 400, and
one rule says who sees the details."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core import mail
from django.test import Client, override_settings
from django.urls import path, reverse

from initpipeline import loading
from tests.records import T0, Phase, make_run

pytestmark = pytest.mark.django_db

ADMINS = [("Ops", "ops@example.com")]


@pytest.fixture(autouse=True)
def fresh_cache() -> Any:
    loading.active.__init__()  # type: ignore[misc]
    loading._handles.clear()
    yield


def request_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "django.request"]


@override_settings(ADMINS=ADMINS, DEBUG=False)
def test_not_ready_answers_are_not_logged_as_errors(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="django.request")
    make_run("running", [Phase("a", "running", start=0), Phase("b", "pending")], at=T0)
    assert client.get("/init/readyz").status_code == 503
    assert client.get("/test/b-total").status_code == 503  # the warming-up page
    # Kept in the log, at INFO; nobody is mailed and no error is counted.
    assert request_records(caplog) == [
        (logging.INFO, "Service Unavailable: /init/readyz"),
        (logging.INFO, "Service Unavailable: /test/b-total"),
    ]
    assert mail.outbox == []


@override_settings(ADMINS=ADMINS, DEBUG=False)
def test_other_server_errors_still_reach_the_admins(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # The same request logger and handlers: a real 500 is still an error, and mailed.
    client.raise_request_exception = False
    with override_settings(ROOT_URLCONF="tests.test_views"):
        assert client.get("/boom").status_code == 500
    assert [level for level, _ in request_records(caplog)] == [logging.ERROR]
    assert len(mail.outbox) == 1


def boom(request: Any) -> Any:
    raise RuntimeError("a real server error")


urlpatterns = [path("boom", boom)]


# -- /init/status.json ----------------------------------------------------------------------


def user(*codenames: str, staff: bool = True) -> User:
    u = User.objects.create_user("someone", password="x", is_staff=staff)
    u.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return u


@pytest.mark.parametrize("bad", ["abc", "-1", "0", "²", "1.5", "9" * 40, ""])
def test_a_run_that_is_not_a_plain_integer_is_a_400(client: Client, bad: str) -> None:
    client.force_login(user("view_pipelinerun"))
    response = client.get(reverse("initpipeline:status"), {"run": bad})
    assert response.status_code == 400
    assert response.json()["detail"] == f"run must be a run id, not {bad[:40]!r}"


def test_an_unknown_run_is_a_404(client: Client) -> None:
    client.force_login(user("view_pipelinerun"))
    response = client.get(reverse("initpipeline:status"), {"run": "42"})
    assert (response.status_code, response.json()) == (404, {"detail": "there is no run 42"})


@pytest.mark.parametrize(
    ("codenames", "staff", "status"),
    [
        (["view_pipelinerun"], True, 200),
        # May open the admin's progress pages (change implies view there): may poll too.
        (["change_pipelinerun"], True, 200),
        # Details are for staff: the permission alone is not enough.
        (["view_pipelinerun"], False, 403),
        ([], True, 403),
    ],
)
def test_one_rule_for_the_progress_pages_and_the_json_they_poll(
    client: Client, codenames: list[str], staff: bool, status: int
) -> None:
    run = make_run("succeeded", [Phase("a", start=0, took=1)])
    client.force_login(user(*codenames, staff=staff))
    page = client.get(reverse("admin:initpipeline_pipelinerun_progress_run", args=[run.pk]))
    data = client.get(reverse("initpipeline:status"), {"run": str(run.pk)})
    assert data.status_code == status
    # A non-staff user is sent to the admin login; staff get the page or a 403.
    expected_page = status if staff else 302
    assert page.status_code == expected_page


def test_the_probes_say_what_never_cache_says(client: Client) -> None:
    from django.http import HttpResponse
    from django.test import RequestFactory
    from django.views.decorators.cache import never_cache

    reference = never_cache(lambda request: HttpResponse())(RequestFactory().get("/"))
    for probe in ("/init/livez", "/init/readyz", "/init/readyz?artifact=nope"):
        response = client.get(probe)
        assert response["Cache-Control"] == reference["Cache-Control"], probe
        assert response["Expires"][-4:] == reference["Expires"][-4:] == " GMT"
