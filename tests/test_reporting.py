"""reporting.py: one report of the records, the same in every place that shows it."""

from __future__ import annotations

import contextlib
import io
import json
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from initpipeline import history, reporting
from initpipeline.exceptions import PipelineConfigError
from tests.records import T0, Phase, make_generation, make_run

pytestmark = pytest.mark.django_db


def two_runs() -> tuple[int, int]:
    """Run 1 succeeded and is active; run 2 is in flight, with a message and an error."""
    first = make_run(
        "succeeded",
        [Phase("a", start=0, took=2), Phase("b", start=2, took=8)],
        trigger="start_init",
    )
    make_generation(first, [("a_out", "json", 10), ("b_out", "npy", 4096)])
    second = make_run(
        "running",
        [
            Phase("a", "cached", message="cached: fingerprint matches a verified artifact"),
            # Waiting for its retry; recovery (which init_status runs) leaves it alone.
            Phase(
                "b",
                "pending",
                done=1,
                total=4,
                attempt=1,
                max_attempts=3,
                message="secret/path step 1 of 4",
                error="RuntimeError: attempt 1 failed",
            ),
        ],
        at=T0 + timedelta(hours=1),
    )
    return first.pk, second.pk


def init_status_json() -> dict[str, object]:
    out = io.StringIO()
    # Not ready or failed exits non-zero; the JSON is printed all the same.
    with contextlib.suppress(CommandError):
        call_command("init_status", "--json", stdout=out)
    return json.loads(out.getvalue())


def test_status_json_is_init_status_json(client: Client) -> None:
    two_runs()
    staff = User.objects.create_user("ops", password="x", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_pipelinerun"))
    client.force_login(staff)
    web = client.get(reverse("initpipeline:status")).json()
    cli = init_status_json()
    assert web == cli
    assert cli["state"] == "ready"
    assert cli["run"]["phases"][1]["error"] == "RuntimeError: attempt 1 failed"


def test_public_progress_carries_no_message_or_error() -> None:
    _, second = two_runs()
    report = reporting.latest_run_report()
    assert report is not None and report.id == second
    public = report.public()
    assert public["phases"] == [
        {"name": "a", "state": "cached", "progress": 1.0},
        {"name": "b", "state": "pending", "progress": 0.25},
    ]
    assert public["progress"] == 0.625
    assert public["run_state"] == "running"
    assert "secret" not in json.dumps(public)


def test_building_a_report_never_writes() -> None:
    two_runs()
    with CaptureQueriesContext(connection) as queries:
        reporting.status_report()
        reporting.latest_run_report()
    written = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
    ]
    assert written == []


def test_previous_timings_take_one_query(django_assert_num_queries: object) -> None:
    make_run("succeeded", [Phase("a", start=0, took=4), Phase("b", start=4, took=10)])
    make_run("succeeded", [Phase("a", start=0, took=7)], at=T0 + timedelta(hours=1))
    run = make_run(
        "pending", [Phase("a", "pending"), Phase("b", "pending")], at=T0 + timedelta(hours=2)
    )
    with django_assert_num_queries(1):  # type: ignore[operator]
        timings = history.previous_timings(run, ["a", "b"])
    # a's latest real run took 7 s; b last ran in the first run.
    assert timings == {"a": 7.0, "b": 10.0}


def test_unknown_run_is_a_config_error() -> None:
    with pytest.raises(PipelineConfigError, match="there is no run 42"):
        reporting.status_report(run_id=42)


def sharded_run() -> int:
    shard = {"shard_of": "b", "shard_count": 2}
    run = make_run(
        "running",
        [
            Phase("a", start=0, took=1),
            Phase("b#0", "succeeded", start=1, took=2, extra={**shard, "shard_index": 0}),
            Phase(
                "b#1",
                "running",
                start=1,
                done=1,
                total=4,
                extra={**shard, "shard_index": 1, "depends_on": ["a"], "worker": "w2@host"},
            ),
            Phase("b", "pending", extra={"shard_count": 2, "depends_on": ["b#0", "b#1"]}),
        ],
        at=T0 + timedelta(hours=2),
    )
    return run.pk


def test_a_sharded_phase_reports_its_shards_under_it() -> None:
    sharded_run()
    report = reporting.latest_run_report()
    assert report is not None
    assert [p.name for p in report.phases] == ["a", "b"]
    b = report.phases[1]
    assert [s.name for s in b.shards or []] == ["b#0", "b#1"]
    # The phase's progress is its shards' and its merge's: (1 + 0.25 + 0) / 3.
    assert b.progress == pytest.approx(1.25 / 3)
    data = b.as_dict()
    assert [(s["index"], s["state"], s["progress"], s["worker"]) for s in data["shards"]] == [
        (0, "succeeded", 1.0, ""),
        (1, "running", 0.25, "w2@host"),
    ]
    assert [p.name for p in report.lanes()] == ["a", "b", "b#0", "b#1"]
    assert "shards" not in report.phases[0].as_dict()
    # The phase started with its first shard, though its own row (the merge) has not.
    assert b.started_at == T0 + timedelta(hours=2, seconds=1)
    assert b.duration is not None and b.duration > 0


def test_a_sharded_phase_spans_its_shards_and_its_merge() -> None:
    shard = {"shard_of": "b", "shard_count": 2}
    make_run(
        "succeeded",
        [
            Phase("b#0", "succeeded", start=0, took=5, extra={**shard, "shard_index": 0}),
            Phase("b#1", "succeeded", start=1, took=5, extra={**shard, "shard_index": 1}),
            Phase("b", "succeeded", start=7, took=2, extra={"shard_count": 2}),
        ],
    )
    report = reporting.latest_run_report()
    assert report is not None
    (b,) = report.phases
    assert b.started_at == T0 and b.finished_at == T0 + timedelta(seconds=9)
    assert b.duration == 9.0
    assert b.as_dict()["duration"] == 9.0


def test_a_sharded_phase_runs_from_its_first_shards_start() -> None:
    shard = {"shard_of": "b", "shard_count": 2}
    make_run(
        "running",
        [
            Phase("b#0", "succeeded", start=0, took=5, extra={**shard, "shard_index": 0}),
            Phase("b#1", "running", start=1, done=1, total=2, extra={**shard, "shard_index": 1}),
            Phase("b", "pending", extra={"shard_count": 2}),
        ],
    )
    report = reporting.latest_run_report()
    assert report is not None
    (b,) = report.phases
    # Its own row (the merge's) is pending; the phase is running, everywhere it is shown.
    assert b.state == "running"
    assert b.public() == {"name": "b", "state": "running", "progress": 0.5}
    assert b.as_dict()["state"] == "running"


def test_the_admin_and_the_terminal_show_each_shard(client: Client) -> None:
    from initpipeline import formatters

    run_id = sharded_run()
    staff = User.objects.create_user("ops", password="x", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_pipelinerun"))
    client.force_login(staff)
    page = client.get(reverse("admin:initpipeline_pipelinerun_progress_run", args=[run_id]))
    html = page.content.decode()
    for name in ("b#0", "b#1"):
        assert f'<tr data-phase="{name}" class="ip-shard">' in html
    report = reporting.latest_run_report()
    assert report is not None
    names = [
        line.split()[0]
        for line in formatters.table(formatters.phase_rows(report.phases)).splitlines()
    ]
    assert names == ["PHASE", "a", "b", "b#0", "b#1"]


def test_init_status_shows_what_each_web_server_serves() -> None:
    from initpipeline.formatters import web_lines
    from tests.records import web_process

    old_run = make_run("succeeded", [Phase("a", start=0, took=1)])
    old = make_generation(old_run, [("a_out", "json", 10)])
    new_run = make_run("succeeded", [Phase("a", start=0, took=1)], at=T0 + timedelta(hours=1))
    new = make_generation(new_run, [("a_out", "json", 11)])
    web_process(11, new)
    web_process(12, new)
    web_process(
        13,
        old,
        loading={"target": new.pk, "since": {"model": 1.0}},
        failures={
            "model": {"error": "RuntimeError: no\nmore", "attempts": 3, "digest": "blake3:1"}
        },
    )
    web_process(21, None, host="web-2", server="")
    web_process(31, new, host="web-3", reported_ago=600)  # gone: no report for 10 minutes

    report = reporting.status_report()
    assert [w.pid for w in report.web] == [11, 12, 13, 21]
    assert web_lines(report.web) == [
        "web processes (as they last reported):",
        f"  web-1, gunicorn 100: 3 processes: 2 on generation {new.pk}, 1 on generation {old.pk}",
        f"    pid 13 loading model of generation {new.pk}",
        "    pid 13: model failed to load (3 attempts): RuntimeError: no",
        "  web-2: 1 process: 1 with nothing loaded yet",
    ]
    web = report.as_dict()["web"]
    assert web[2] == {
        "host": "web-1",
        "pid": 13,
        "server": "gunicorn 100",
        "state": "serving",
        "generation": old.pk,
        "serves": {"model": old.pk},
        "loading_generation": new.pk,
        "loading": ["model"],
        "failures": {"model": {"error": "RuntimeError: no\nmore", "attempts": 3}},
        "reported_at": web[2]["reported_at"],
    }
    out = io.StringIO()
    with contextlib.suppress(SystemExit, CommandError):
        call_command("init_status", stdout=out)
    assert "\n".join(web_lines(report.web)) in out.getvalue()


def test_the_plan_prints_names_and_reasons_as_plain_text() -> None:
    from types import SimpleNamespace

    from initpipeline.formatters import plan_text

    phase = SimpleNamespace(
        name="evil\x1b]0;title\x07name", action="run", reason="code\x1b[31m changed"
    )
    plan = SimpleNamespace(phases=[phase], to_run=[phase], up_to_date=False, active=None)
    assert plan_text(plan) == "evilname  run  code changed\n1 of 1 phase to run"  # type: ignore[arg-type]


def test_init_status_is_not_ready_while_a_required_active_artifact_is_corrupt() -> None:
    import os

    from initpipeline import storage
    from tests.records import publish_generation

    gen = publish_generation(b_out=("npy", [1.0, 2.0, 3.0]))
    art = gen.artifacts.get()
    path = storage.local_path(art)
    os.chmod(path, 0o644)
    with open(path, "ab") as fh:
        fh.write(b"!")  # a stray write: readyz answers 503 for it on this host
    try:
        check_corrupt_status(art)
    finally:
        # Every file under the artifacts folder is named by its digest (other tests check).
        path.unlink()


def check_corrupt_status(art: Any) -> None:
    report = reporting.status_report()
    assert report.state == "not_ready"
    assert report.corrupt == {
        "b_out": f"its file changed: {art.size + 1} bytes, {art.size} published"
    }
    out = io.StringIO()
    with pytest.raises(CommandError) as exc:
        call_command("init_status", stdout=out)
    assert (str(exc.value), exc.value.returncode) == ("not ready: corrupt b_out", 3)
    assert "corrupt: b_out: its file changed" in out.getvalue()
