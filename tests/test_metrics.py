"""Prometheus metrics: exact exposition of a staged run, two queries per scrape whatever the
run's size, shards counted by state unless asked, and who may read them."""

from __future__ import annotations

import hmac
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client, override_settings
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest

from initpipeline import metrics
from initpipeline.metrics import InitPipelineCollector
from initpipeline.models import PhaseRun, PipelineRun
from tests.records import T0, Phase, make_generation, make_run

pytestmark = pytest.mark.django_db

NOW = T0 + timedelta(seconds=45)
TOKEN = "a-test-token-of-32-characters-xx"


def exposition(collector: InitPipelineCollector | None = None) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or InitPipelineCollector())
    return generate_latest(registry).decode()


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timezone, "now", lambda: NOW)


def staged() -> tuple[Any, PipelineRun]:
    """A generation made an hour ago, and a run in flight: a done, b at 30 %, c waiting."""
    earlier = make_run(
        "succeeded",
        [Phase("a", start=0, took=10), Phase("b", start=10, took=20), Phase("c", start=30, took=5)],
        at=T0 - timedelta(hours=1),
    )
    generation = make_generation(
        earlier, [("a_out", "json", 100), ("b_out", "npy", 4096), ("c_out", "json", 50)]
    )
    run = make_run(
        "running",
        [
            Phase("a", start=0, took=12),
            Phase("b", "running", start=12, done=30, total=100),
            Phase("c", "pending"),
        ],
    )
    PhaseRun.objects.filter(run=run, name="b").update(
        heartbeat_at=T0 + timedelta(seconds=40), losses=1, handoffs=2
    )
    return generation, run


def states(kind: str, current: str, phase: str | None = None) -> str:
    names = (
        ["pending", "running", "succeeded", "cached", "failed", "upstream_failed", "cancelled"]
        if phase
        else ["pending", "running", "succeeded", "failed", "cancelled"]
    )
    where = f'phase="{phase}",' if phase else ""
    return "".join(
        f'initpipeline_{kind}_state{{{where}state="{s}"}} {1.0 if s == current else 0.0}\n'
        for s in names
    )


def digest(name: str) -> str:
    """The digest tests/records.make_generation gives artifact ``name``."""
    return "blake3:" + (name.encode().hex() * 64)[:64]


def test_a_staged_run_exposes_exactly_these_series(frozen: None) -> None:
    generation, run = staged()
    assert exposition() == (
        "# HELP initpipeline_ready 1 when the active generation holds every required artifact "
        "(REQUIRED_ARTIFACTS, else every artifact of the pipeline), else 0.\n"
        "# TYPE initpipeline_ready gauge\n"
        "initpipeline_ready 1.0\n"
        "# HELP initpipeline_active_generation_id The id of the active generation.\n"
        "# TYPE initpipeline_active_generation_id gauge\n"
        f"initpipeline_active_generation_id {float(generation.pk)}\n"
        "# HELP initpipeline_active_generation_activated_timestamp_seconds When the active "
        "generation was activated (Unix time).\n"
        "# TYPE initpipeline_active_generation_activated_timestamp_seconds gauge\n"
        # An hour before T0, plus the 35 s the earlier run took.
        "initpipeline_active_generation_activated_timestamp_seconds 1.741078835e+09\n"
        "# HELP initpipeline_artifact_size_bytes Size of each artifact of the active "
        "generation.\n"
        "# TYPE initpipeline_artifact_size_bytes gauge\n"
        'initpipeline_artifact_size_bytes{artifact="a_out"} 100.0\n'
        'initpipeline_artifact_size_bytes{artifact="b_out"} 4096.0\n'
        'initpipeline_artifact_size_bytes{artifact="c_out"} 50.0\n'
        "# HELP initpipeline_artifact_info Each artifact of the active generation: its digest "
        "(with its algorithm) and format, as labels; always 1.\n"
        "# TYPE initpipeline_artifact_info gauge\n"
        f'initpipeline_artifact_info{{artifact="a_out",digest="{digest("a_out")}",'
        f'format="json"}} 1.0\n'
        f'initpipeline_artifact_info{{artifact="b_out",digest="{digest("b_out")}",'
        f'format="npy"}} 1.0\n'
        f'initpipeline_artifact_info{{artifact="c_out",digest="{digest("c_out")}",'
        f'format="json"}} 1.0\n'
        "# HELP initpipeline_run_id The id of the latest run.\n"
        "# TYPE initpipeline_run_id gauge\n"
        f"initpipeline_run_id {float(run.pk)}\n"
        "# HELP initpipeline_run_state The latest run's state: 1 for the state it is in, 0 for "
        "the others.\n"
        "# TYPE initpipeline_run_state gauge\n"
        f"{states('run', 'running')}"
        "# HELP initpipeline_run_created_timestamp_seconds When start_init created the latest "
        "run (Unix time).\n"
        "# TYPE initpipeline_run_created_timestamp_seconds gauge\n"
        "initpipeline_run_created_timestamp_seconds 1.7410824e+09\n"
        "# HELP initpipeline_run_start_timestamp_seconds When the latest run's first phase "
        "started (Unix time).\n"
        "# TYPE initpipeline_run_start_timestamp_seconds gauge\n"
        "initpipeline_run_start_timestamp_seconds 1.7410824e+09\n"
        "# HELP initpipeline_run_duration_seconds Seconds the latest run has taken since its "
        "first phase started (so far, while in flight).\n"
        "# TYPE initpipeline_run_duration_seconds gauge\n"
        "initpipeline_run_duration_seconds 45.0\n"
        "# HELP initpipeline_run_expected_duration_seconds What the latest run's phases took "
        "the last time each ran for real, along the run's longest path (cached phases count "
        "0); absent when one never ran.\n"
        "# TYPE initpipeline_run_expected_duration_seconds gauge\n"
        "initpipeline_run_expected_duration_seconds 35.0\n"
        "# HELP initpipeline_run_progress_ratio The latest run's progress, from 0 to 1: the "
        "mean of its phases'.\n"
        "# TYPE initpipeline_run_progress_ratio gauge\n"
        "initpipeline_run_progress_ratio 0.433333\n"
        "# HELP initpipeline_run_estimated_remaining_seconds Seconds the latest run has left, "
        "from each phase's last real duration (0 once it succeeded; absent when unknown, "
        "failed or cancelled).\n"
        "# TYPE initpipeline_run_estimated_remaining_seconds gauge\n"
        # b: 33 s in at 30 %, so its own pace says 77 s more, weighed by its progress against
        # its history's 20 s (already past): 0.3 * 77; then c's 5 s.
        "initpipeline_run_estimated_remaining_seconds 28.1\n"
        "# HELP initpipeline_phase_state Each phase's state in the latest run: 1 for its "
        "state, 0 for the others.\n"
        "# TYPE initpipeline_phase_state gauge\n"
        f"{states('phase', 'succeeded', 'a')}"
        f"{states('phase', 'running', 'b')}"
        f"{states('phase', 'pending', 'c')}"
        "# HELP initpipeline_phase_progress_ratio Each phase's progress in the latest run, from "
        "0 to 1 (a sharded phase's counts its shards' and its merge's).\n"
        "# TYPE initpipeline_phase_progress_ratio gauge\n"
        'initpipeline_phase_progress_ratio{phase="a"} 1.0\n'
        'initpipeline_phase_progress_ratio{phase="b"} 0.3\n'
        'initpipeline_phase_progress_ratio{phase="c"} 0.0\n'
        "# HELP initpipeline_phase_attempts_total Attempts of each phase in the latest run "
        "(failures and timeouts start a new one; a sharded phase's is its tasks' highest). "
        "Starts again with each run.\n"
        "# TYPE initpipeline_phase_attempts_total counter\n"
        'initpipeline_phase_attempts_total{phase="a"} 1.0\n'
        'initpipeline_phase_attempts_total{phase="b"} 1.0\n'
        'initpipeline_phase_attempts_total{phase="c"} 0.0\n'
        "# HELP initpipeline_phase_losses_total Times each phase lost its worker in the latest "
        "run (LOST_LIMIT; a sharded phase's: its tasks' sum). Starts again with each run.\n"
        "# TYPE initpipeline_phase_losses_total counter\n"
        'initpipeline_phase_losses_total{phase="a"} 0.0\n'
        'initpipeline_phase_losses_total{phase="b"} 1.0\n'
        'initpipeline_phase_losses_total{phase="c"} 0.0\n'
        "# HELP initpipeline_phase_handoffs_total Times a worker shutting down handed each "
        "phase back in the latest run (a sharded phase's: its tasks' sum). Starts again with "
        "each run.\n"
        "# TYPE initpipeline_phase_handoffs_total counter\n"
        'initpipeline_phase_handoffs_total{phase="a"} 0.0\n'
        'initpipeline_phase_handoffs_total{phase="b"} 2.0\n'
        'initpipeline_phase_handoffs_total{phase="c"} 0.0\n'
        "# HELP initpipeline_phase_heartbeat_age_seconds Seconds since each running phase last "
        "beat (a sharded phase's: its stalest running task's); a phase silent for STALE_AFTER "
        "counts as lost.\n"
        "# TYPE initpipeline_phase_heartbeat_age_seconds gauge\n"
        'initpipeline_phase_heartbeat_age_seconds{phase="b"} 5.0\n'
        "# HELP initpipeline_phase_duration_seconds Seconds each phase of the latest run has "
        "taken (so far, while it runs).\n"
        "# TYPE initpipeline_phase_duration_seconds gauge\n"
        'initpipeline_phase_duration_seconds{phase="a"} 12.0\n'
        'initpipeline_phase_duration_seconds{phase="b"} 33.0\n'
        "# HELP initpipeline_phase_previous_duration_seconds Seconds each phase took the last "
        "time it ran for real (succeeded, not cached), before the latest run.\n"
        "# TYPE initpipeline_phase_previous_duration_seconds gauge\n"
        'initpipeline_phase_previous_duration_seconds{phase="a"} 10.0\n'
        'initpipeline_phase_previous_duration_seconds{phase="b"} 20.0\n'
        'initpipeline_phase_previous_duration_seconds{phase="c"} 5.0\n'
    )


def test_before_any_run_only_readiness_is_exposed() -> None:
    assert exposition().splitlines()[-1] == "initpipeline_ready 0.0"
    assert [line for line in exposition().splitlines() if not line.startswith("#")] == [
        "initpipeline_ready 0.0"
    ]


def test_a_generation_without_a_required_artifact_is_not_ready(frozen: None) -> None:
    earlier = make_run("succeeded", [Phase("a", start=0, took=1)])
    make_generation(earlier, [("a_out", "json", 10)])  # the tests require b_out
    assert "initpipeline_ready 0.0\n" in exposition()


def sharded_run(shards: int, *, earlier: bool = False) -> PipelineRun:
    """A run of a phase ``embed`` in ``shards`` shards (the first running, the odd ones done,
    the others waiting) between two plain phases, as services.start() records it;
    ``earlier``: the same an hour before, every row done (the history of the next run)."""
    at = T0 - timedelta(hours=1) if earlier else T0
    run = PipelineRun.objects.create(
        state="succeeded" if earlier else "running", created_at=at, started_at=at
    )

    def row(name: str, state: str, **fields: Any) -> PhaseRun:
        began = at + timedelta(seconds=5) if state != "pending" else None
        ended = at + timedelta(seconds=20) if state == "succeeded" else None
        return PhaseRun(
            run=run,
            name=name,
            position=len(rows),
            state=state,
            fingerprint="fp",
            version="1",
            attempt=1 if began else 0,
            started_at=began,
            finished_at=ended,
            **fields,
        )

    rows: list[PhaseRun] = []
    rows.append(row("prepare", "succeeded"))
    for i in range(shards):
        state = "running" if i == 0 else ("succeeded" if i % 2 else "pending")
        rows.append(
            row(
                f"embed#{i}",
                "succeeded" if earlier else state,
                shard_of="embed",
                shard_index=i,
                shard_count=shards,
                depends_on=["prepare"],
                losses=1 if i == 0 and not earlier else 0,
                progress_done=1 if state == "succeeded" else 0,
                progress_total=2,
                heartbeat_at=at + timedelta(seconds=30) if i == 0 else None,
            )
        )
    names = [r.name for r in rows[1:]]
    done = "succeeded" if earlier else "pending"
    rows.append(row("embed", done, shard_count=shards, depends_on=names))
    rows.append(row("check", done, depends_on=["embed"]))
    PhaseRun.objects.bulk_create(rows)
    return run


def samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


@pytest.mark.parametrize("shards", [0, 1000])
def test_a_scrape_costs_two_queries_whatever_the_run(
    frozen: None, shards: int, django_assert_num_queries: Any
) -> None:
    if shards:
        sharded_run(shards, earlier=True)
        sharded_run(shards)
    else:
        staged()
    with django_assert_num_queries(2):
        exposition()


def test_shards_are_counted_by_state_unless_asked(frozen: None) -> None:
    sharded_run(1000)
    text = exposition()
    assert samples(text, "initpipeline_shard_progress_ratio") == []
    assert samples(text, "initpipeline_phase_shards") == [
        'initpipeline_phase_shards{phase="embed",state="pending"} 499.0',
        'initpipeline_phase_shards{phase="embed",state="running"} 1.0',
        'initpipeline_phase_shards{phase="embed",state="succeeded"} 500.0',
        'initpipeline_phase_shards{phase="embed",state="cached"} 0.0',
        'initpipeline_phase_shards{phase="embed",state="failed"} 0.0',
        'initpipeline_phase_shards{phase="embed",state="upstream_failed"} 0.0',
        'initpipeline_phase_shards{phase="embed",state="cancelled"} 0.0',
    ]
    # The phase's own series say what its shards do: it runs, its progress is theirs and
    # its merge's (500 of its 1,001 tasks done), its loss is its running shard's, and its
    # heartbeat is its stalest running shard's.
    assert 'initpipeline_phase_state{phase="embed",state="running"} 1.0' in text
    assert 'initpipeline_phase_progress_ratio{phase="embed"} 0.4995\n' in text
    assert 'initpipeline_phase_losses_total{phase="embed"} 1.0\n' in text
    assert 'initpipeline_phase_heartbeat_age_seconds{phase="embed"} 15.0\n' in text
    # Each name has one series per phase and state: 4 phases, 7 states.
    assert len(samples(text, "initpipeline_phase_state")) == 3 * 7
    assert len(text.splitlines()) < 150


@override_settings(INITPIPELINE={"METRICS_SHARDS": True})
def test_metrics_shards_adds_a_series_per_shard(frozen: None) -> None:
    sharded_run(3)
    text = exposition()
    assert samples(text, "initpipeline_shard_progress_ratio") == [
        'initpipeline_shard_progress_ratio{phase="embed",shard="0"} 0.0',
        'initpipeline_shard_progress_ratio{phase="embed",shard="1"} 1.0',
        'initpipeline_shard_progress_ratio{phase="embed",shard="2"} 0.0',
    ]
    assert samples(text, "initpipeline_shard_losses_total") == [
        'initpipeline_shard_losses_total{phase="embed",shard="0"} 1.0',
        'initpipeline_shard_losses_total{phase="embed",shard="1"} 0.0',
        'initpipeline_shard_losses_total{phase="embed",shard="2"} 0.0',
    ]
    assert samples(text, "initpipeline_shard_heartbeat_age_seconds") == [
        'initpipeline_shard_heartbeat_age_seconds{phase="embed",shard="0"} 15.0',
    ]


def test_the_collector_joins_an_existing_registry_without_querying_at_register(
    frozen: None, django_assert_num_queries: Any
) -> None:
    registry = CollectorRegistry()  # auto_describe, as prometheus-client's default one
    with django_assert_num_queries(0):
        metrics.register(registry)
    staged()
    text = generate_latest(registry).decode()
    assert "initpipeline_ready 1.0\n" in text
    # This process's loading metrics come along (no multiprocess folder here).
    assert "# TYPE initpipeline_artifact_load_duration_seconds histogram\n" in text


# -- who may read them ------------------------------------------------------------------------


def user(*codenames: str, staff: bool = True) -> User:
    u = User.objects.create_user("someone", password="x", is_staff=staff)
    u.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return u


@pytest.mark.parametrize(
    ("token", "header", "status"),
    [
        (TOKEN, f"Bearer {TOKEN}", 200),
        (TOKEN, f"bearer {TOKEN}", 200),
        (TOKEN, "Bearer wrong-token-of-the-same-length-xx", 401),
        (TOKEN, f"Bearer {TOKEN[:-1]}", 401),
        (TOKEN, "Bearer ", 401),
        (TOKEN, None, 401),
        # No token configured: no bearer token opens it.
        (None, f"Bearer {TOKEN}", 401),
        (None, "Bearer ", 401),
    ],
)
def test_prometheus_scrapes_with_the_bearer_token_only(
    client: Client, token: str | None, header: str | None, status: int
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    with override_settings(INITPIPELINE={"METRICS_TOKEN": token}):
        response = client.get("/init/metrics", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response["WWW-Authenticate"] == 'Bearer realm="initpipeline metrics"'
        assert response.content == b"a valid bearer token is needed\n"
    else:
        assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert b"initpipeline_ready 0.0\n" in response.content
    assert "no-store" in response["Cache-Control"]


@pytest.mark.parametrize(
    ("codenames", "staff", "status"),
    [
        (["view_pipelinerun"], True, 200),
        (["change_pipelinerun"], True, 200),
        (["view_pipelinerun"], False, 403),
        ([], True, 403),
    ],
)
def test_staff_who_may_see_the_details_read_them_in_a_browser(
    client: Client, codenames: list[str], staff: bool, status: int
) -> None:
    client.force_login(user(*codenames, staff=staff))
    with override_settings(INITPIPELINE={"METRICS_TOKEN": TOKEN}):
        response = client.get("/init/metrics")
    assert response.status_code == status


def test_the_token_is_compared_in_constant_time(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr("initpipeline.views.hmac.compare_digest", compare_digest)
    with override_settings(INITPIPELINE={"METRICS_TOKEN": TOKEN}):
        client.get("/init/metrics", headers={"Authorization": "Bearer guess"})
    assert compared == [(b"guess", TOKEN.encode())]


def test_prometheus_gets_openmetrics_when_it_asks(client: Client) -> None:
    # What Prometheus 2.x sends.
    accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    with override_settings(INITPIPELINE={"METRICS_TOKEN": TOKEN}):
        response = client.get(
            "/init/metrics", headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept}
        )
    assert response["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.content.endswith(b"# EOF\n")
