"""Serving in the background, in this process: the loader thread, swaps, failures, pins,
readiness, declarations and directory artifacts. (Real Gunicorn servers:
tests/test_gunicorn_serving.py.)"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from django.test import Client, override_settings

from initpipeline import digests, formats, loading, retention, serving, storage
from initpipeline.exceptions import ArtifactLoadError, ArtifactNotReady, PipelineConfigError
from initpipeline.health import readiness
from initpipeline.servers import SERVING, ServerFolder
from tests.conftest import wait_for
from tests.records import publish_generation
from tests.servingapp import views
from tests.testapp.work import var_dir

pytestmark = pytest.mark.django_db(transaction=True)

SERVING_SETTINGS = {"REQUIRED_ARTIFACTS": ["model"], "REFRESH_INTERVAL": 0.05}


def write_control(**values: Any) -> None:
    scratch = var_dir() / "control.json.new"
    scratch.write_text(json.dumps(values))
    os.replace(scratch, var_dir() / "control.json")


def loads() -> list[tuple[int, str, str, float, int]]:
    """tests/servingapp's loads.log: (pid, event, version, time, models alive)."""
    path = var_dir() / "loads.log"
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [(int(r[0]), r[1], r[2], float(r[3]), int(r[4])) for r in rows]


def events(event: str, version: str) -> list[tuple[int, str, str, float, int]]:
    return [row for row in loads() if row[1] == event and row[2] == version]


@pytest.fixture
def repo(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[serving.Repository]:
    """This process serving in the background, with tests/servingapp's handles declared."""
    settings.INITPIPELINE = {**settings.INITPIPELINE, **SERVING_SETTINGS}
    # The pipeline of this process is tests/testapp's, which does not produce the required
    # "model" (tests/servingapp's phase, whose artifacts these tests publish themselves):
    # the start's settings check would refuse to serve (test_gunicorn_serving tests it).
    monkeypatch.setattr(serving.checks, "refuse_to_serve", lambda: None)
    loading.active.__init__()  # type: ignore[misc]
    loading._handles.clear()
    loading._handles.update(model=views.MODEL, folder=views.FOLDER)
    views.MODEL.swap = "load-first"
    (var_dir() / "loads.log").unlink(missing_ok=True)
    write_control()
    started = serving.start()
    yield started
    serving.stop()
    write_control()
    loading._handles.clear()
    # The loader froze what it loaded (and all else) out of the collector's reach.
    gc.unfreeze()


def served(repo: serving.Repository, version: str) -> bool:
    found = repo.current.loaded.get("model")
    return found is not None and found.value.version == version


def test_a_handle_loads_in_the_background_and_get_never_waits(repo: serving.Repository) -> None:
    write_control(loader={"hold": ["1"]})
    gen = publish_generation(model=("json", {"version": "1"}))
    wait_for(lambda: events("start", "1"), timeout=30)
    # The load is under way in the loader's thread: a request is told at once.
    with pytest.raises(ArtifactNotReady, match="not loaded in this process yet"):
        views.MODEL.get()
    response = Client().get("/test/model", HTTP_ACCEPT="application/json")
    assert response.status_code == 503
    body, ready = readiness()
    assert not ready and body["checks"]["artifact:model"][0]["output"] == "loading"

    write_control()
    wait_for(lambda: served(repo, "1"), timeout=30)
    assert views.MODEL.get().warm  # warmed before any request could get it
    assert views.MODEL.generation == gen.pk
    response = Client().get("/test/model")
    assert response.status_code == 200
    assert response.json() == {
        "pid": os.getpid(),
        "generation": gen.pk,
        "version": "1",
        "warm": True,
    }
    assert readiness()[1] is True
    assert [e[1] for e in loads()] == ["start", "loaded", "warm"]


def gauge(metric: Any, **labels: str) -> float | None:
    """The value of one of this process's load gauges (metrics.py), None if never set."""
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels == labels:
                return float(sample.value)
    return None


def test_the_metrics_say_what_loads_and_whether_this_process_is_ready(
    repo: serving.Repository,
) -> None:
    from initpipeline import loadmetrics as metrics

    write_control(loader={"hold": ["1"]})
    publish_generation(model=("json", {"version": "1"}))
    wait_for(lambda: events("start", "1"), timeout=30)
    assert gauge(metrics.LOADING, artifact="model") == 1.0
    write_control()
    wait_for(lambda: served(repo, "1"), timeout=30)
    assert gauge(metrics.LOADING, artifact="model") == 0.0
    assert gauge(metrics.SERVING_READY) == 1.0
    assert gauge(metrics.SERVING_GENERATION) == float(views.MODEL.generation or 0)


def test_a_switch_serves_the_old_object_until_the_new_one_is_warm(
    repo: serving.Repository,
) -> None:
    old = publish_generation(model=("json", {"version": "1"}))
    wait_for(lambda: served(repo, "1"), timeout=30)
    write_control(loader={"hold": ["2"]})
    new = publish_generation(model=("json", {"version": "2"}))
    wait_for(lambda: events("start", "2"), timeout=30)
    # Load-first: the old model is still in memory while the new one loads, and serves.
    assert events("start", "2")[0][4] == 1
    assert views.MODEL.get().version == "1" and views.MODEL.generation == old.pk
    assert readiness()[0]["checks"]["artifact:model"][0] == {
        "componentType": "artifact",
        "status": "pass",
        "output": f"serving generation {old.pk}; loading a newer one",
    }
    # A request that began before the switch keeps its objects to its end.
    with serving.pinned():
        write_control()
        wait_for(lambda: served(repo, "2"), timeout=30)
        assert views.MODEL.get().version == "1" and views.MODEL.generation == old.pk
    assert views.MODEL.get().version == "2" and views.MODEL.generation == new.pk
    # The old model is freed by the loader once the last request holding it is done.
    wait_for(lambda: len(views._alive) == 1, timeout=30)


def test_free_first_drops_the_old_object_before_loading_the_new(
    repo: serving.Repository,
) -> None:
    views.MODEL.swap = "free-first"
    publish_generation(model=("json", {"version": "1"}))
    wait_for(lambda: served(repo, "1"), timeout=30)
    write_control(loader={"hold": ["2"]})
    publish_generation(model=("json", {"version": "2"}))
    wait_for(lambda: events("start", "2"), timeout=30)
    # Nothing of version 1 is left while version 2 loads: one copy at most.
    assert events("start", "2")[0][4] == 0
    with pytest.raises(ArtifactNotReady):
        views.MODEL.get()
    assert Client().get("/test/model").status_code == 503
    write_control()
    wait_for(lambda: served(repo, "2"), timeout=30)
    assert Client().get("/test/model").json()["version"] == "2"


def test_new_worker_without_a_server_of_several_workers_loads_as_load_first(
    repo: serving.Repository, caplog: pytest.LogCaptureFixture
) -> None:
    # No Gunicorn server here: no sibling could serve while a new worker loads.
    views.MODEL.swap = "new-worker"
    publish_generation(model=("json", {"version": "1"}))
    wait_for(lambda: served(repo, "1"), timeout=30)
    write_control(loader={"hold": ["2"]})
    with caplog.at_level(logging.INFO, logger="initpipeline"):
        publish_generation(model=("json", {"version": "2"}))
        wait_for(lambda: events("start", "2"), timeout=30)
        # Loading in this process, the old model serving meanwhile, as load-first.
        assert events("start", "2")[0][4] == 1
        assert views.MODEL.get().version == "1"
        write_control()
        wait_for(lambda: served(repo, "2"), timeout=30)
    assert repo.pid == os.getpid()
    said = [r.getMessage() for r in caplog.records if "needs a Gunicorn server" in r.getMessage()]
    assert said == [
        "swap='new-worker' needs a Gunicorn server of two workers or more: loading "
        f"generation {views.MODEL.generation} in this worker instead (as load-first)"
    ]


@pytest.fixture
def sibling() -> Iterator[int]:
    """The pid of a live process standing for another worker of the server."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


class Worker(NamedTuple):
    """A Repository as a Gunicorn worker of a server with a sibling, not started."""

    repo: serving.Repository
    folder: ServerFolder
    replaced: list[int]  # the pid, each time it asked Gunicorn for a new worker


@pytest.fixture
def worker(sibling: int) -> Iterator[Worker]:
    replaced: list[int] = []
    repo = serving.Repository()
    repo.replace_me = lambda: replaced.append(repo.pid)
    folder = repo.server_folder = ServerFolder(sibling)
    folder.write(repo.pid, SERVING, ["model"], 6)
    yield Worker(repo, folder, replaced)
    shutil.rmtree(folder.path, ignore_errors=True)


def test_a_worker_that_sees_its_sibling_make_way_waits_for_its_turn(
    worker: Worker, sibling: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both workers of a two-worker server see generation 7 at once. The sibling claims the
    # turn and leaves the folder after this worker found the turn free, but before it
    # looked for siblings that serve: it must wait for its turn, not load in this process.
    repo, folder, replaced = worker
    assert folder.claim_turn(sibling, 7)
    monkeypatch.setattr(folder, "turn_taken", lambda: False)
    assert repo._make_way(7, {}, ["model"]) == serving.settings.REFRESH_INTERVAL
    assert replaced == []
    # Its successor serves and gives the turn back: now it is this worker's turn.
    folder.give_turn_back()
    folder.write(sibling, SERVING, ["model"], 7)
    assert repo._make_way(7, {}, ["model"]) == serving.settings.REFRESH_INTERVAL
    assert replaced == [repo.pid]
    turn = folder.turn()
    assert turn is not None and (turn["pid"], turn["generation"]) == (repo.pid, 7)


def test_a_worker_alone_in_its_server_loads_itself_and_leaves_the_turn_free(
    worker: Worker,
) -> None:
    repo, folder, replaced = worker
    assert repo._make_way(7, {}, ["model"]) is None
    assert replaced == [] and folder.turn() is None


def test_a_failing_load_keeps_the_old_object_and_is_retried_with_backoff(
    repo: serving.Repository, caplog: pytest.LogCaptureFixture
) -> None:
    old = publish_generation(model=("json", {"version": "1"}))
    wait_for(lambda: served(repo, "1"), timeout=30)
    write_control(loader={"fail": ["2"]})
    with caplog.at_level(logging.DEBUG, logger="initpipeline"):
        publish_generation(model=("json", {"version": "2"}))
        wait_for(lambda: len(events("failed", "2")) >= 4, timeout=60)
    assert views.MODEL.get().version == "1" and views.MODEL.generation == old.pk
    failure = repo.failures["model"]
    assert failure.error == (
        "the loader of artifact 'model' raised RuntimeError: cannot load model version 2"
    )
    assert failure.attempts >= 4
    # Backoff: RETRY_BACKOFF (0.2 s in the tests) doubling, with jitter down to half.
    times = [e[3] for e in events("failed", "2")]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(gap >= 0.2 * 2**i * 0.5 for i, gap in enumerate(gaps[:3])), gaps
    # Logged once with its traceback; the attempts after it only at DEBUG.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "keeps serving" in errors[0].getMessage()
    body, ready = readiness()
    assert ready and body["status"] == "warn"
    assert body["checks"]["artifact:model"][0]["output"] == (
        f"serving generation {old.pk}; the active generation's failed to load (see the logs)"
    )
    # Readiness tells probes no error text: that is for staff and the logs.
    assert "RuntimeError" not in json.dumps(body)

    write_control()
    wait_for(lambda: served(repo, "2"), timeout=30)
    assert "model" not in repo.failures


def test_a_request_sees_one_generation_across_its_handles(repo: serving.Repository) -> None:
    publish_generation(model=("json", {"version": "1"}), folder=("dir", _folder("one")))
    wait_for(lambda: served(repo, "1") and "folder" in repo.current.loaded, timeout=30)
    with serving.pinned():
        publish_generation(model=("json", {"version": "2"}), folder=("dir", _folder("two")))
        wait_for(lambda: served(repo, "2"), timeout=30)
        # Both changed, and the switch published both at once; this request sees neither.
        assert views.MODEL.get().version == "1"
        assert views.FOLDER.get() == {"a.txt": "one", "sub/b.txt": "one!"}
    assert views.MODEL.generation == views.FOLDER.generation
    assert views.FOLDER.get() == {"a.txt": "two", "sub/b.txt": "two!"}


def _folder(text: str) -> Path:
    root = var_dir() / f"folder-{text}"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(text)
    (root / "sub" / "b.txt").write_text(text + "!")
    return root


def test_a_switch_prunes_the_hosts_cache_of_generations_no_longer_kept(
    repo: serving.Repository, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # KEEP_GENERATIONS 1, yet a serving process keeps two: a sibling worker may still
    # serve the previous generation.
    settings.INITPIPELINE = {**settings.INITPIPELINE, "KEEP_GENERATIONS": 1}
    monkeypatch.setattr(retention, "RECENT", -3600.0)  # everything counts as made before
    unpacked = storage.cache_dir() / "dirs"
    names = []
    for n in ("1", "2", "3"):
        gen = publish_generation(model=("json", {"version": n}), folder=("dir", _folder(n)))
        wait_for(lambda n=n: served(repo, n), timeout=30)
        names.append(digests.name_part(gen.artifacts.get(name="folder").digest))
        assert (unpacked / names[-1]).is_dir()
    wait_for(lambda: not (unpacked / names[0]).exists(), timeout=30)
    assert (unpacked / names[1]).is_dir() and (unpacked / names[2]).is_dir()
    assert views.FOLDER.get() == {"a.txt": "3", "sub/b.txt": "3!"}


def test_readiness_waits_for_the_other_workers_of_the_server(
    repo: serving.Repository, tmp_path: Path
) -> None:
    publish_generation(model=("json", {"version": "1"}))
    wait_for(lambda: served(repo, "1"), timeout=30)
    assert readiness()[1] is True
    folder = ServerFolder(os.getppid())
    repo.server_folder = folder
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.write(sibling.pid, SERVING, [], None)
        body, ready = readiness()
        assert not ready
        assert body["checks"]["artifact:model"][0]["output"] == (
            f"not loaded yet by worker {sibling.pid} of this server"
        )
        folder.write(sibling.pid, SERVING, ["model"], None)
        assert readiness()[1] is True
        folder.write(sibling.pid, SERVING, [], None)
        assert readiness()[1] is False
        # A worker that is gone (killed without its master's child_exit hook) stops counting.
        sibling.kill()
        sibling.wait()
        wait_for(lambda: readiness()[1], timeout=10)
        assert not (folder.path / f"{sibling.pid}.json").exists()
    finally:
        sibling.kill()
        sibling.wait()
        repo.server_folder = None


# -- declarations ---------------------------------------------------------------------------


@pytest.fixture
def handles() -> Iterator[None]:
    loading.active.__init__()  # type: ignore[misc]
    loading._handles.clear()
    yield
    loading._handles.clear()


def first(path: Path) -> str:
    return "first"


def second(path: Path) -> str:
    return "second"


def test_one_name_declared_with_two_loaders_is_an_error_at_import(handles: None) -> None:
    handle = loading.artifact("m", loader=first)
    assert loading.artifact("m", loader=first) is handle
    assert loading.artifact("m") is handle and handle.loader is first
    with pytest.raises(PipelineConfigError, match="artifact\\('m'\\) is declared twice"):
        loading.artifact("m", loader=second)
    with pytest.raises(PipelineConfigError, match="swap must be one of 'load-first', 'free-first'"):
        loading.artifact("m", swap="later")
    with pytest.raises(PipelineConfigError, match="must be a function"):
        loading.artifact("n", loader="faiss.read_index")  # type: ignore[arg-type]
    # A bare handle first, a loader later: the handle takes it.
    bare = loading.artifact("o")
    assert loading.artifact("o", loader=second) is bare and bare.loader is second


def test_a_loader_error_outside_a_serving_process_names_the_artifact(handles: None) -> None:
    publish_generation(model=("json", {"version": "3"}))
    write_control(loader={"fail": ["3"]})
    try:
        handle = loading.artifact("model", loader=views.load_model)
        with pytest.raises(ArtifactLoadError, match="the loader of artifact 'model' raised") as exc:
            handle.get()
        assert isinstance(exc.value.__cause__, RuntimeError)
    finally:
        write_control()


# -- directory artifacts ----------------------------------------------------------------------


def test_a_folder_is_one_artifact_unpacked_read_only_once_per_host(
    handles: None, caplog: pytest.LogCaptureFixture
) -> None:
    source = _folder("x")
    first_gen = publish_generation(folder=("dir", source))
    again = publish_generation(folder=("dir", source))
    # Its bytes depend on the content only: the same folder gives the same digest.
    assert first_gen.artifacts.get().digest == again.artifacts.get().digest
    handle = loading.artifact("folder", loader=views.load_folder)
    assert handle.get() == {"a.txt": "x", "sub/b.txt": "x!"}
    path = handle.path()
    assert path.is_dir() and path.parent.name == "dirs"
    assert (path / "a.txt").stat().st_mode & 0o777 == 0o444

    # An edit of the unpacked folder is noticed (even with its times put back), and it
    # is unpacked again from the verified archive.
    target = path / "sub" / "b.txt"
    before = target.stat()
    os.chmod(path / "sub", 0o755)
    os.chmod(target, 0o644)
    target.write_text("x?")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    record = loading.Record(
        *again.artifacts.values_list("name", "pk", "storage_key", "digest", "size", "format")[0]
    )
    with caplog.at_level(logging.WARNING, logger="initpipeline"):
        assert storage.materialize(record.as_artifact()) == path
    assert (path / "sub" / "b.txt").read_text() == "x!"
    assert "unpacking" in caplog.text and "again" in caplog.text


def test_a_folder_with_a_link_is_refused_with_its_name(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").symlink_to("/etc/hostname")
    with pytest.raises(PipelineConfigError, match="weights in .* is a symbolic link"):
        formats.write_dir(tmp_path / "out.tar", tmp_path / "model")


# -- loading without stopping the process's other threads -------------------------------------


def _ticks_during(load: Any) -> int:
    """How many times another thread ran (every millisecond it can) during ``load()``."""
    ticks = 0
    stop = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not stop.is_set():
            time.sleep(0.001)
            ticks += 1

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        time.sleep(0.05)
        begun = ticks
        load()
        during = ticks - begun
    finally:
        stop.set()
        thread.join()
    return during


@override_settings(SECRET_KEY="s" * 50)
def test_a_pickle_loads_without_holding_the_gil_from_start_to_end(tmp_path: Path) -> None:
    model = {i: (i, str(i)) for i in range(1_000_000)}
    path = tmp_path / "model.pkl"
    formats.write_pickle(path, model)
    payload = path.read_bytes()[len(formats.PICKLE_MAGIC) + 32 :]
    del model
    # pickle.loads is one C call: the other thread cannot run until it returns.
    assert _ticks_during(lambda: pickle.loads(payload)) <= 2  # noqa: S301
    # Ours hands the GIL over between the pickle's frames.
    assert _ticks_during(lambda: formats.read_pickle(path)) >= 10


def test_a_retired_model_is_freed_without_stopping_the_other_threads() -> None:
    def model() -> dict[str, tuple[int, str]]:
        return {f"k{i}": (i, str(i)) for i in range(1_000_000)}

    # A dict that is not the last reference (a request's local variable) is left whole.
    held = model()
    serving._release([held].pop())
    assert len(held) == 1_000_000
    # Freed in one go, a dict of a million entries stops every thread until it is gone...
    values = [held]
    del held
    assert _ticks_during(lambda: values.clear()) <= 2
    # ...freed a slice at a time, it lets them run.
    values = [model()]
    assert _ticks_during(lambda: serving._release(values.pop())) >= 10


def test_outside_a_serving_process_the_same_bytes_in_a_newer_generation_are_not_loaded_again(
    handles: None,
) -> None:
    first = publish_generation(model=("json", {"version": "1"}))
    handle = loading.artifact("model", loader=views.load_model)
    model = handle.get()
    assert handle.generation == first.pk
    second = publish_generation(model=("json", {"version": "1"}))
    loading.active.refresh()
    assert handle.get() is model  # not loaded again: the same bytes
    assert handle.generation == second.pk  # but it serves the newer generation
