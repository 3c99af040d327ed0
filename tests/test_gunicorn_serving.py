"""The last mile, on a real Gunicorn: no request waits for an artifact's load.

The tests publish generations themselves (tests/records.publish_generation) and steer
tests/servingapp's loader through the control file; they wait on its loads.log and on the
answers, not on the clock.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.conftest import Stack, wait_for
from tests.records import publish_generation
from tests.test_gunicorn import Gunicorn
from tests.test_serving import events

pytestmark = [pytest.mark.slow]

SERVING_ENV = {
    "INITPIPELINE_TEST_PIPELINE": "serving",
    "INITPIPELINE_TEST_SETTINGS": json.dumps({"REQUIRED_ARTIFACTS": ["model"]}),
}


class Answer(NamedTuple):
    sent: float  # time.time()
    received: float
    status: int
    pid: int | None
    version: str | None
    generation: int | None


class Clients:
    """Threads asking /test/model without a pause, recording every answer."""

    def __init__(self, server: Gunicorn, count: int = 4, path: str = "/test/model") -> None:
        self.server = server
        self.path = path
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ask) for _ in range(count)]

    def _ask(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            try:
                code, _, body = self.server.get(self.path, timeout=30, Accept="application/json")
            except (OSError, http.client.HTTPException) as exc:
                # A worker killed under the request (the tests SIGKILL some) cuts its
                # answer short: IncompleteRead.
                self.errors.append(repr(exc))
                continue
            data = json.loads(body) if code == 200 else {}
            self.answers.append(
                Answer(
                    sent,
                    time.time(),
                    code,
                    data.get("pid"),
                    data.get("version"),
                    data.get("generation"),
                )
            )

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def ok(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 200]

    def pids(self) -> set[int]:
        return {a.pid for a in self.ok() if a.pid is not None}


def control(stack: Stack, **values: Any) -> None:
    stack.control(**values)


@pytest.fixture
def serve(stack: Stack) -> Iterator[Any]:
    servers: list[Gunicorn] = []
    (stack.var / "loads.log").unlink(missing_ok=True)

    def start(*args: str, env: dict[str, str] | None = None) -> Gunicorn:
        server = Gunicorn(stack, *args, env={**SERVING_ENV, **(env or {})})
        servers.append(server)
        server.wait_until_up()
        return server

    yield start
    for server in servers:
        server.stop()


def started_pids(version: str) -> set[int]:
    return {row[0] for row in events("start", version)}


WORKER_CLASSES = {
    "gthread": (),
    "sync": ("--worker-class", "sync"),
    "gthread-preload": ("--preload",),
}


@pytest.mark.parametrize("worker", WORKER_CLASSES)
def test_a_switch_under_load_never_waits_for_the_slow_loader(
    stack: Stack, serve: Any, worker: str
) -> None:
    old = publish_generation(model=("json", {"version": "1"}))
    server = serve("--workers", "2", *WORKER_CLASSES[worker])
    wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=60, log=server.log_path)
    control(stack, loader={"hold": ["2"]})
    with Clients(server) as clients:
        wait_for(lambda: len(clients.pids()) == 2, timeout=30)
        pids = clients.pids()
        new = publish_generation(model=("json", {"version": "2"}))
        # Both workers are loading version 2, and hold it there...
        wait_for(lambda: started_pids("2") == pids, timeout=30, log=server.log_path)
        held_at = max(row[3] for row in events("start", "2"))
        # ...while each goes on answering with version 1: no request waits for the load.
        wait_for(
            lambda: {a.pid for a in clients.ok() if a.sent > held_at and a.version == "1"} == pids,
            timeout=30,
        )
        control(stack)
        wait_for(
            lambda: {a.pid for a in clients.ok() if a.version == "2"} == pids,
            timeout=30,
            log=server.log_path,
        )
    assert clients.errors == []
    assert [a for a in clients.answers if a.status != 200] == []
    # Version 2 reached no request before its worker had warmed it, and once a worker
    # answered with it, no later request of that worker got version 1.
    warm = {row[0]: row[3] for row in events("warm", "2")}
    for pid in pids:
        mine = [a for a in clients.ok() if a.pid == pid]
        first_new = min(a.received for a in mine if a.version == "2")
        assert all(a.received >= warm[pid] for a in mine if a.version == "2")
        assert [a for a in mine if a.version == "1" and a.sent > first_new] == []
    assert {a.generation for a in clients.ok()} == {old.pk, new.pk}
    assert all((a.version, a.generation) in {("1", old.pk), ("2", new.pk)} for a in clients.ok())
    log = server.log()
    assert "WORKER TIMEOUT" not in log and log.count("Booting worker") == 2


def test_a_failing_load_keeps_the_old_model_serving_and_is_retried(
    stack: Stack, serve: Any
) -> None:
    old = publish_generation(model=("json", {"version": "1"}))
    server = serve("--workers", "2")
    wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=60, log=server.log_path)
    control(stack, loader={"fail": ["2"]})
    with Clients(server, count=2) as clients:
        wait_for(lambda: len(clients.pids()) == 2, timeout=30)
        pids = clients.pids()
        publish_generation(model=("json", {"version": "2"}))
        # Tried again, and again, by each worker...
        wait_for(
            lambda: all(
                sum(1 for row in events("failed", "2") if row[0] == pid) >= 3 for pid in pids
            ),
            timeout=60,
        )
        code, _, body = server.get("/init/readyz")
        assert code == 200 and json.loads(body)["status"] == "warn"
        control(stack)
        wait_for(lambda: {a.pid for a in clients.ok() if a.version == "2"} == pids, timeout=30)
    # ...while version 1 kept serving: never an error, never a 503.
    assert [a for a in clients.answers if a.status != 200] == []
    assert {a.generation for a in clients.ok() if a.version == "1"} == {old.pk}
    # Logged once per worker, with its traceback; not once per attempt.
    log = server.log()
    assert log.count("loading artifact model of generation") == 2, log
    assert log.count("ArtifactLoadError: the loader of artifact 'model' raised") == 2, log


def test_free_first_answers_warming_up_while_it_loads_and_never_holds_two_copies(
    stack: Stack, serve: Any
) -> None:
    publish_generation(model=("json", {"version": "1"}))
    server = serve("--workers", "1", env={"TESTAPP_SWAP": "free-first"})
    wait_for(lambda: server.get("/test/model")[0] == 200, timeout=60, log=server.log_path)
    control(stack, loader={"hold": ["2"]})
    publish_generation(model=("json", {"version": "2"}))
    wait_for(lambda: events("start", "2"), timeout=30, log=server.log_path)
    # The old model was gone before the new one began to load.
    assert events("start", "2")[0][4] == 0
    code, headers, body = server.get("/test/model", Accept="application/json")
    assert code == 503 and headers["Retry-After"] == "1"
    assert json.loads(body)["missing"] == ["model"]
    assert server.get("/init/readyz")[0] == 503
    control(stack)
    wait_for(lambda: server.get("/test/model")[0] == 200, timeout=30)
    assert json.loads(server.get("/test/model")[2])["version"] == "2"


def test_readiness_is_one_answer_for_every_worker_of_a_server(stack: Stack, serve: Any) -> None:
    control(stack, loader={"hold": ["1"]})
    publish_generation(model=("json", {"version": "1"}))
    server = serve("--workers", "3")
    wait_for(lambda: len(started_pids("1")) == 3, timeout=60, log=server.log_path)
    first, *others = sorted(started_pids("1"))
    # One worker has loaded; the two others still load.
    control(stack, loader={"hold": [f"1@{pid}" for pid in others]})
    wait_for(lambda: [row[0] for row in events("warm", "1")] == [first], timeout=30)
    answers = [server.get("/init/readyz") for _ in range(30)]
    # Whichever worker answers the probe: not ready while any worker cannot serve.
    assert {code for code, _, _ in answers} == {503}
    lacking = {json.loads(body)["checks"]["artifact:model"][0]["output"] for _, _, body in answers}
    # Those still loading say so; the one that loaded names the two it waits for.
    waiting = f"not loaded yet by workers {others[0]}, {others[1]} of this server"
    assert lacking == {"loading", waiting}
    control(stack)
    wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=30)
    # Once it said 200, no request of any worker gets a 503.
    with Clients(server, count=4) as clients:
        wait_for(lambda: len(clients.ok()) >= 300 and len(clients.pids()) == 3, timeout=60)
    assert [a for a in clients.answers if a.status != 200] == []

    # A worker that dies is replaced; its successor loads before it takes a connection,
    # since its siblings serve: no 503 meanwhile, and the server stays ready.
    control(stack, loader={"hold": ["1"]})
    with Clients(server, count=4) as clients:
        wait_for(lambda: len(clients.pids()) == 3, timeout=30)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: started_pids("1") - {first, *others}, timeout=60, log=server.log_path)
        (successor,) = started_pids("1") - {first, *others}
        count = len(clients.answers)
        wait_for(lambda: len(clients.answers) >= count + 200, timeout=60)
        assert server.get("/init/readyz")[0] == 200
        control(stack)
        wait_for(lambda: successor in clients.pids(), timeout=30, log=server.log_path)
    assert [a for a in clients.answers if a.status != 200] == []
    log = server.log()
    assert "loading artifacts before taking connections" in log


HOLDS_THE_GIL = {"loader": {"gil": 5}}


@pytest.mark.parametrize("heartbeat", [True, False], ids=["heartbeat-process", "thread-only"])
def test_a_load_holding_the_gil_past_timeout_costs_no_worker_timeout(
    stack: Stack, serve: Any, tmp_path: Path, heartbeat: bool
) -> None:
    conf = tmp_path / "gunicorn_conf.py"
    hook = (
        "from initpipeline.gunicorn import post_worker_init"
        if heartbeat
        # Serving in a thread alone: nothing beats for the worker while the load
        # holds the GIL (the case the heartbeat process exists for).
        else "def post_worker_init(worker):\n    from initpipeline import serving\n"
        "    serving.start()"
    )
    conf.write_text(f"{hook}\nworker_class = 'sync'\ntimeout = 2\n")
    control(stack, **HOLDS_THE_GIL)
    publish_generation(model=("json", {"version": "1"}))
    server = Gunicorn(stack, "-c", str(conf), "--workers", "1", env=SERVING_ENV)
    try:
        if heartbeat:
            wait_for(lambda: events("warm", "1"), timeout=60, log=server.log_path)
            wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=30)
            log = server.log()
            assert "WORKER TIMEOUT" not in log, log
            assert log.count("Booting worker") == 1, log
        else:
            wait_for(lambda: "WORKER TIMEOUT" in server.log(), timeout=60)
    finally:
        server.stop()


def test_a_folder_artifact_is_served_from_its_unpacked_copy(stack: Stack, serve: Any) -> None:
    source = stack.tmp / "folder"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "sub" / "b.txt").write_text("b")
    gen = publish_generation(model=("json", {"version": "1"}), folder=("dir", source))
    server = serve("--workers", "2")
    wait_for(lambda: server.get("/test/folder")[0] == 200, timeout=60, log=server.log_path)
    assert json.loads(server.get("/test/folder")[2]) == {
        "generation": gen.pk,
        "files": {"a.txt": "a", "sub/b.txt": "b"},
    }


def test_the_loaders_of_each_worker_show_in_the_records(stack: Stack, serve: Any) -> None:
    from initpipeline.models import WebProcess

    gen = publish_generation(model=("json", {"version": "1"}))
    server = serve("--workers", "2")
    wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=60, log=server.log_path)
    rows = wait_for(
        lambda: (r := list(WebProcess.objects.filter(state="serving"))) and len(r) == 2 and r,
        timeout=30,
    )
    assert {r.generation_id for r in rows} == {gen.pk}
    assert all(r.server == f"gunicorn {server.proc.pid}" for r in rows)
    assert all(set(r.serves) == {"model"} and r.serves["model"]["loaded"] for r in rows)
    server.stop()
    # A worker that exits takes its row with it.
    assert WebProcess.objects.count() == 0


def test_new_workers_load_a_new_generation_while_the_others_serve(stack: Stack, serve: Any) -> None:
    """swap="new-worker": no request shares a process (or its GIL) with the load."""
    publish_generation(model=("json", {"version": "1"}))
    server = serve("--workers", "2", env={"TESTAPP_SWAP": "new-worker"})
    wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=60, log=server.log_path)
    control(stack, loader={"hold": ["2"]})
    with Clients(server) as clients:
        wait_for(lambda: len(clients.pids()) == 2, timeout=30)
        old = clients.pids()
        new = publish_generation(model=("json", {"version": "2"}))
        # One old worker made way; its successor loads version 2 before taking a request...
        wait_for(lambda: started_pids("2"), timeout=30, log=server.log_path)
        (first,) = started_pids("2")
        assert first not in old
        held_at = events("start", "2")[0][3]
        # ...while the other old worker serves version 1 alone.
        count = len(clients.ok())
        wait_for(lambda: len(clients.ok()) >= count + 50, timeout=30)
        assert first not in clients.pids()
        assert {a.version for a in clients.ok() if a.sent > held_at} == {"1"}
        control(stack)
        # Then the second old worker makes way in its turn.
        wait_for(
            lambda: len({a.pid for a in clients.ok() if a.version == "2"}) == 2,
            timeout=60,
            log=server.log_path,
        )
    assert [a for a in clients.answers if a.status != 200] == []
    assert clients.errors == []
    serving_new = {a.pid for a in clients.ok() if a.version == "2"}
    assert serving_new.isdisjoint(old)
    # No old worker ever loaded version 2: the loads ran in the new workers only.
    assert started_pids("2") == serving_new
    assert {a.generation for a in clients.ok() if a.version == "2"} == {new.pk}
    log = server.log()
    assert log.count("makes way for a new one") == 2, log
    assert "WORKER TIMEOUT" not in log


def test_a_new_worker_that_cannot_load_serves_what_its_siblings_serve(
    stack: Stack, serve: Any
) -> None:
    old = publish_generation(model=("json", {"version": "1"}))
    server = serve("--workers", "2", env={"TESTAPP_SWAP": "new-worker"})
    wait_for(lambda: server.get("/init/readyz")[0] == 200, timeout=60, log=server.log_path)
    control(stack, loader={"fail": ["2"]})
    with Clients(server, count=2) as clients:
        wait_for(lambda: len(clients.pids()) == 2, timeout=30)
        before = clients.pids()
        new = publish_generation(model=("json", {"version": "2"}))
        wait_for(lambda: events("failed", "2"), timeout=30, log=server.log_path)
        (successor,) = {row[0] for row in events("failed", "2")}
        # It serves version 1, as the worker beside it does, which stays.
        wait_for(lambda: successor in clients.pids(), timeout=30, log=server.log_path)
        count = len(clients.ok())
        wait_for(lambda: len(clients.ok()) >= count + 50, timeout=30)
    assert [a for a in clients.answers if a.status != 200] == []
    assert {a.version for a in clients.ok()} == {"1"}
    assert {a.generation for a in clients.ok()} == {old.pk}
    # The other old worker was left in place: it and the new one answer from then on.
    failed_at = events("failed", "2")[0][3]
    late = {a.pid for a in clients.ok() if a.sent > failed_at}
    assert len(late) == 2 and successor in late and len(late & before) == 1

    # Both workers say so to the probe (the old one at its next look), and stay ready.
    def warned() -> bool:
        answers = [server.get("/init/readyz") for _ in range(10)]
        return all(
            code == 200 and json.loads(body)["status"] == "warn" for code, _, body in answers
        )

    wait_for(warned, timeout=30)
    log = server.log()
    assert f"generation {new.pk} failed to load in this new worker" in log, log
    assert log.count("makes way for a new one") == 1, log


@pytest.mark.parametrize(
    ("setting", "check"),
    [
        ({"REFRESH_INTERVAL": "fast"}, "initpipeline.E014"),
        ({"STORAGE": "nowhere"}, "initpipeline.E007"),
        ({"REQUIRED_ARTIFACTS": "model"}, "initpipeline.E020"),
    ],
)
def test_a_bad_setting_stops_gunicorn_at_boot_with_one_line(
    stack: Stack, setting: dict[str, Any], check: str
) -> None:
    """Gunicorn runs no system checks: without this, every request would answer 500 (or
    readyz 503 for ever)."""
    env = {**SERVING_ENV, "INITPIPELINE_TEST_SETTINGS": json.dumps(setting)}
    server = Gunicorn(stack, "--workers", "2", env=env)
    try:
        assert server.proc.wait(timeout=60) != 0
    finally:
        server.stop()
    log = server.log()
    errors = [line for line in log.splitlines() if check in line]
    assert errors and all("[ERROR] initpipeline: " in line for line in errors), log
    assert "Worker failed to boot" in log, log
    # (Gunicorn prints a traceback of its own as it halts; none goes through our code.)
    assert not [line for line in log.splitlines() if "initpipeline/" in line], log
