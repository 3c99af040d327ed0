"""The per-process artifact cache, the warming-up responses and the probes (in-process)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.conf import settings
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from initpipeline import formats, loading, storage
from initpipeline.exceptions import ArtifactCorrupt, ArtifactNotReady
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fresh_cache() -> Any:
    loading.active.__init__()  # type: ignore[misc]
    loading._handles.clear()
    yield


def activate(**arrays: Any) -> Generation:
    """Publish arrays as artifacts of a new succeeded run and make it the active generation."""
    run = PipelineRun.objects.create(state="succeeded", finished_at=timezone.now())
    records = []
    for name, value in arrays.items():
        path = storage.new_scratch_path(".npy")
        formats.write_npy(path, np.asarray(value, dtype=np.float32))
        pub = storage.publish(path, name=name, suffix=".npy")
        records.append(
            Artifact.objects.create(
                name=name,
                fingerprint="0" * 64,
                storage_key=pub.key,
                digest=pub.digest,
                size=pub.size,
                format="npy",
                run=run,
            )
        )
    Generation.objects.filter(is_active=True).update(is_active=False)
    gen = Generation.objects.create(run=run, is_active=True, activated_at=timezone.now())
    gen.artifacts.set(records)
    return gen


def test_handle_does_no_io_until_get(django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(0):
        handle = loading.artifact("b_out")
        assert repr(handle) == "artifact('b_out')"
    assert loading.artifact("b_out") is handle


def test_get_raises_not_ready_without_a_generation() -> None:
    with pytest.raises(ArtifactNotReady, match="artifact 'b_out' is not active yet"):
        loading.artifact("b_out").get()


def test_get_loads_once_memory_mapped_then_costs_no_query(
    django_assert_num_queries: Any,
) -> None:
    activate(b_out=[1, 2, 3])
    first = loading.artifact("b_out").get()
    assert isinstance(first, np.memmap)
    assert first.tolist() == [1, 2, 3]
    with django_assert_num_queries(0):
        for _ in range(100):
            assert loading.artifact("b_out").get() is first


@override_settings(INITPIPELINE={**settings.INITPIPELINE, "REFRESH_INTERVAL": 3600})
def test_refresh_interval_throttles_the_lookup(django_assert_num_queries: Any) -> None:
    activate(b_out=[1])
    handle = loading.artifact("b_out")
    old = handle.get()
    gen = activate(b_out=[5])
    with django_assert_num_queries(0):
        assert handle.get() is old  # not looked at again within REFRESH_INTERVAL
    loading.active.refresh()
    new = handle.get()
    assert new.tolist() == [5]
    assert loading.active.snapshot().generation_id == gen.pk
    # A request that got the old object keeps a working object.
    assert old.tolist() == [1]


def test_corrupt_file_is_refused_and_reported_by_readyz(artifacts_dir: Path) -> None:
    gen = activate(b_out=[1, 2, 3, 4])
    record = gen.artifacts.get()
    path = artifacts_dir / record.storage_key
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match="fails its checksum"):
        loading.artifact("b_out").get()
    response = Client().get("/init/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["description"] == "corrupt: b_out"
    assert body["checks"]["artifact:b_out"] == [
        {
            "componentType": "artifact",
            "status": "fail",
            "output": "its file failed its check; run start_init to rebuild it",
        }
    ]
    path.unlink()


def test_livez_touches_no_database(django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(0):
        response = Client().get("/init/livez")
    assert response.status_code == 200
    assert response.content == b"ok\n"


def test_readyz_is_503_with_progress_until_the_required_artifacts_are_active() -> None:
    run = PipelineRun.objects.create(state="running", started_at=timezone.now())
    for i, (name, state, done) in enumerate([("a", "succeeded", 1), ("b", "running", 0.25)]):
        PhaseRun.objects.create(
            run=run,
            name=name,
            position=i,
            state=state,
            fingerprint="f",
            version="1",
            progress_done=done,
            progress_total=1,
            message="secret detail",
        )
    response = Client().get("/init/readyz")
    assert response.status_code == 503
    assert response["Content-Type"] == "application/health+json"
    assert response["Retry-After"] == "1"
    assert "no-store" in response["Cache-Control"]
    body = response.json()
    assert body["status"] == "fail"
    assert body["description"] == "warming up: waiting for b_out"
    assert body["checks"]["phase:b"] == [
        {"componentType": "phase", "status": "warn", "observedValue": 0.25, "observedUnit": "ratio"}
    ]
    assert "secret detail" not in response.content.decode()

    run.state = "succeeded"
    run.save()
    activate(b_out=[1])
    loading.active.refresh()
    response = Client().get("/init/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "pass",
        "description": "artifacts ready",
        "checks": {"artifact:b_out": [{"componentType": "artifact", "status": "pass"}]},
    }


def test_readyz_makes_no_query_once_ready(django_assert_num_queries: Any) -> None:
    # Within REFRESH_INTERVAL, which the test stretches over its whole length.
    with override_settings(INITPIPELINE={**settings.INITPIPELINE, "REFRESH_INTERVAL": 3600}):
        with CaptureQueriesContext(connection) as queries:
            assert Client().get("/init/readyz").status_code == 503
        assert len(queries) > 0  # not ready: it reads the run's progress
        activate(b_out=[1, 2])
        loading.active.refresh()
        with django_assert_num_queries(0):
            for _ in range(20):
                response = Client().get("/init/readyz")
                assert (response.status_code, response.json()["status"]) == (200, "pass")
            assert Client().get("/init/readyz?artifact=b_out").status_code == 200


def test_readyz_for_one_artifact_and_an_unknown_one() -> None:
    activate(a_out=[1])
    assert Client().get("/init/readyz?artifact=a_out").status_code == 200
    assert Client().get("/init/readyz?artifact=c_out").status_code == 503
    response = Client().get("/init/readyz?artifact=nope")
    assert response.status_code == 404
    assert response.json()["description"] == "no phase produces 'nope'"


def test_warming_up_page_for_browsers_and_json_for_api_clients() -> None:
    html = Client().get("/test/b-total", HTTP_ACCEPT="text/html,*/*;q=0.8")
    assert html.status_code == 503
    assert html["Retry-After"] == "1"
    assert html["Cache-Control"] == "no-store"
    assert "<title>Warming up</title>" in html.content.decode()
    api = Client().get("/test/b-total", HTTP_ACCEPT="application/json")
    assert api.status_code == 503
    assert api.json() == {
        "status": "warming_up",
        "missing": ["b_out"],
        "run_state": None,
        "progress": 0.0,
        "estimate_seconds": None,
        "phases": [],
    }
    activate(b_out=[1, 2])
    loading.active.refresh()
    ok = Client().get("/test/b-total")
    assert ok.status_code == 200
    assert json.loads(ok.content)["total"] == 3.0


@override_settings(
    INITPIPELINE={"WARMUP_PATHS": {"/about": ["b_out"]}, "REFRESH_INTERVAL": 0.001},
    MIDDLEWARE=["initpipeline.middleware.WarmingUpMiddleware"],
)
def test_middleware_guards_url_prefixes() -> None:
    assert Client().get("/about").status_code == 503
    assert Client().get("/init/livez").status_code == 200
    activate(b_out=[1])
    assert Client().get("/about").status_code == 200


def test_health_check_class_for_django_health_check() -> None:
    from health_check.exceptions import ServiceUnavailable

    from initpipeline.contrib.health_check import InitPipelineReady

    with pytest.raises(ServiceUnavailable, match="waiting for b_out"):
        InitPipelineReady().run()
    activate(b_out=[1])
    loading.active.refresh()
    InitPipelineReady().run()
    with pytest.raises(ServiceUnavailable, match="waiting for c_out"):
        InitPipelineReady(artifact="c_out").run()


# -- a warm-up flood costs the database nothing per request -------------------------------


def _start_a_run() -> PipelineRun:
    run = PipelineRun.objects.create(state="running")
    PhaseRun.objects.create(
        run=run, name="a", position=0, state="running", progress_done=1, progress_total=2
    )
    PhaseRun.objects.create(run=run, name="b", position=1, state="pending")
    return run


@override_settings(INITPIPELINE={**settings.INITPIPELINE, "REFRESH_INTERVAL": 3600})
def test_not_ready_answers_make_no_query_within_the_interval(
    django_assert_num_queries: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "NOT_READY_INTERVAL", 3600)
    _start_a_run()
    client = Client()
    assert client.get("/init/readyz").status_code == 503  # looks, once
    with django_assert_num_queries(0):
        for _ in range(20):
            readyz = client.get("/init/readyz")
            page = client.get("/test/b-total", HTTP_ACCEPT="text/html")
            api = client.get("/test/b-total", HTTP_ACCEPT="application/json")
            assert (readyz.status_code, page.status_code, api.status_code) == (503, 503, 503)
    assert readyz.json()["checks"]["phase:a"][0]["observedValue"] == 0.5
    assert api.json()["phases"][0] == {"name": "a", "state": "running", "progress": 0.5}


@override_settings(INITPIPELINE={**settings.INITPIPELINE, "REFRESH_INTERVAL": 3600})
def test_not_ready_answers_look_again_after_the_interval(
    django_assert_max_num_queries: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "NOT_READY_INTERVAL", 0.05)
    run = _start_a_run()
    client = Client()
    assert client.get("/init/readyz").status_code == 503
    PhaseRun.objects.filter(run=run, name="a").update(progress_done=1.5)
    time.sleep(0.06)
    assert client.get("/init/readyz").json()["checks"]["phase:a"][0]["observedValue"] == 0.75
    # ...and turns ready within the interval of the activation, not REFRESH_INTERVAL.
    activate(b_out=[1])
    time.sleep(0.06)
    with django_assert_max_num_queries(4):
        assert client.get("/init/readyz").status_code == 200


@override_settings(INITPIPELINE={**settings.INITPIPELINE, "REFRESH_INTERVAL": 3600})
def test_ready_answers_make_no_query(django_assert_num_queries: Any) -> None:
    activate(b_out=[1, 2])
    client = Client()
    assert client.get("/init/readyz").status_code == 200
    assert client.get("/test/b-total").status_code == 200  # loads b_out once
    with django_assert_num_queries(0):
        for _ in range(20):
            assert client.get("/init/readyz").status_code == 200
            assert client.get("/test/b-total").json()["total"] == 3.0


def test_a_database_that_is_down_is_not_asked_again_for_every_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loading, "NOT_READY_INTERVAL", 3600)
    calls = []

    def down(self: Any) -> Any:
        calls.append(1)
        raise ArtifactNotReady("cannot read the active generation: database is down")

    monkeypatch.setattr(loading.ActiveGeneration, "_query", down)
    for _ in range(5):
        assert not loading.artifact("b_out").ready()
    # One look per interval: _query turns a DatabaseError into this ArtifactNotReady.
    assert calls == [1]


@override_settings(INITPIPELINE={**settings.INITPIPELINE, "REFRESH_INTERVAL": 3600})
def test_a_crowd_gets_answers_built_once_per_look_at_the_progress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from initpipeline import health, responses

    monkeypatch.setattr(loading, "NOT_READY_INTERVAL", 3600)
    rendered: list[str] = []
    built: list[list[str]] = []
    real_render, real_build = responses.render_to_string, health._readiness

    def render(*args: Any, **kwargs: Any) -> str:
        rendered.append(args[0])
        return real_render(*args, **kwargs)

    def build(names: list[str], *args: Any) -> Any:
        built.append(names)
        return real_build(names, *args)

    monkeypatch.setattr(responses, "render_to_string", render)
    monkeypatch.setattr(health, "_readiness", build)
    _start_a_run()
    client = Client()
    pages = {client.get("/test/b-total").content for _ in range(10)}
    probes = {client.get("/init/readyz").content for _ in range(10)}
    assert (len(pages), len(rendered), len(probes), len(built)) == (1, 1, 1, 1)
    # A new look at the progress (here: forced) builds them again.
    loading.active._progress = None
    client.get("/test/b-total")
    client.get("/init/readyz")
    assert (len(rendered), len(built)) == (2, 2)


def test_an_overridden_warming_up_page_is_rendered_for_each_request(tmp_path: Path) -> None:
    from initpipeline import responses

    folder = tmp_path / "initpipeline"
    folder.mkdir()
    (folder / "warming_up.html").write_text("Hello {{ request.GET.name }}: {{ progress }}")
    templates = [{**settings.TEMPLATES[0], "DIRS": [str(tmp_path)]}]
    responses._page_is_ours.cache_clear()
    try:
        with override_settings(TEMPLATES=templates):
            client = Client()
            assert client.get("/test/b-total?name=ann").content == b"Hello ann: 0.0"
            assert client.get("/test/b-total?name=bob").content == b"Hello bob: 0.0"
    finally:
        responses._page_is_ours.cache_clear()
