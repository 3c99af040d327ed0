"""One OpenTelemetry trace per run, across real processes: start_init's root span, a span per
phase copy in whichever worker ran it, losses, hand-offs and retries as events; through the
SDK's in-memory exporter, and once through the OTLP/HTTP exporter into a receiver of ours,
beside opentelemetry-instrumentation-celery's own spans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from initpipeline.models import Generation, PhaseRun, PipelineRun
from tests.conftest import Stack, wait_for

pytestmark = [pytest.mark.slow]


def spans_in(folder: Path) -> list[dict[str, Any]]:
    """Every span the processes exported (tests/tracing_setup.py's files)."""
    found = []
    for path in sorted(folder.glob("spans-*.jsonl")):
        found += [json.loads(line) for line in path.read_text().splitlines() if line]
    return found


def events(span: dict[str, Any]) -> list[str]:
    return [e["name"] for e in span["events"]]


def phase(run: PipelineRun, name: str) -> PhaseRun:
    return PhaseRun.objects.get(run=run, name=name)


def test_one_trace_per_run_through_a_loss_a_hand_off_and_a_retry(
    stack: Stack, tmp_path: Path
) -> None:
    folder = tmp_path / "spans"
    folder.mkdir()
    stack.env.update(INITPIPELINE_TEST_TRACING="memory", INITPIPELINE_TEST_SPANS=str(folder))
    # b: 60 steps of 0.1 s, a checkpoint every 10; c fails its first attempt.
    stack.control(sleep={"b": 6}, checkpoint={"b": 10}, fail_attempts={"c": 1})
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = PipelineRun.objects.get()

    # SIGKILL mid-phase, past a checkpoint: no code of ours runs; its span is lost with it.
    wait_for(lambda: int((phase(run, "b").checkpoint or {}).get("done") or 0) >= 10, 60, 0.05)
    os.killpg(stack.workers[0].pid, signal.SIGKILL)
    stack.workers[0].wait()
    second = stack.start_worker()
    # Recovery in the new worker finds the loss and sends b again; it resumes.
    wait_for(lambda: phase(run, "b").losses == 1 and phase(run, "b").state == "running", 60)
    resumed_at = phase(run, "b").progress_done
    wait_for(lambda: phase(run, "b").progress_done >= resumed_at + 5, 30, 0.05)
    # SIGTERM: a warm shutdown; b checkpoints and hands itself back.
    os.kill(stack.workers[1].pid, signal.SIGTERM)
    try:
        stack.workers[1].wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(stack.log(1)) from None
    assert phase(run, "b").handoffs == 1
    third = stack.start_worker()
    run = stack.ended(run)
    assert run.state == "succeeded", run.error
    generation = Generation.objects.get(run=run)

    wait_for(lambda: any(s["name"] == "finish_run" for s in spans_in(folder)), 30)
    spans = spans_in(folder)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    # One trace: the run's.
    assert len({s["context"]["trace_id"] for s in spans}) == 1
    (root,) = by_name["start_init"]
    assert root["parent_id"] is None
    assert root["attributes"]["initpipeline.run.id"] == run.pk
    assert root["attributes"]["initpipeline.run.trigger"] == run.trigger
    # Every other span is the root's child, whichever process made it.
    assert {s["parent_id"] for s in spans if s is not root} == {root["context"]["span_id"]}
    assert sorted(by_name) == [
        "finish_run",
        "lost b",
        "phase a",
        "phase b",
        "phase c",
        "start_init",
    ]

    (a,) = by_name["phase a"]
    assert a["status"]["status_code"] == "OK"
    assert a["attributes"]["initpipeline.phase.fingerprint"] == phase(run, "a").fingerprint
    assert a["attributes"]["initpipeline.phase.reason"] == "never built"
    assert a["attributes"]["initpipeline.worker"].startswith("test0@")

    # The killed copy of b exported nothing; recovery (in the second worker's main process)
    # recorded the loss in a span of its own.
    (lost,) = by_name["lost b"]
    assert events(lost) == ["initpipeline.lost"]
    assert (
        "lost (loss 1 of 3 allowed) during attempt 1"
        in (lost["events"][0]["attributes"]["initpipeline.reason"])
    )
    # Then two copies of b: the second worker's, which resumed and handed b back, and the
    # third's, which resumed and finished it. Neither was a new attempt.
    handed, finished = sorted(by_name["phase b"], key=lambda s: s["start_time"])
    assert handed["attributes"]["initpipeline.worker"] == second
    assert events(handed) == ["initpipeline.resumed", "initpipeline.handed_off"]
    assert handed["attributes"]["initpipeline.task.state"] == "IGNORED"
    assert finished["attributes"]["initpipeline.worker"] == third
    assert events(finished) == ["initpipeline.resumed"]
    assert finished["status"]["status_code"] == "OK"
    for copy, handoffs in ((handed, 0), (finished, 1)):
        assert copy["attributes"]["initpipeline.phase.attempt"] == 1
        assert copy["attributes"]["initpipeline.phase.losses"] == 1
        assert copy["attributes"]["initpipeline.phase.handoffs"] == handoffs

    # c: a failed attempt (its retry an event, its status the error), then a second one.
    failed, retried = sorted(by_name["phase c"], key=lambda s: s["start_time"])
    assert events(failed) == ["initpipeline.retry"]
    assert failed["status"] == {
        "status_code": "ERROR",
        "description": "RuntimeError: c fails attempt 1",
    }
    assert failed["attributes"]["initpipeline.task.state"] == "RETRY"
    assert retried["attributes"]["initpipeline.phase.attempt"] == 2
    assert retried["status"]["status_code"] == "OK"

    (finish,) = by_name["finish_run"]
    assert finish["attributes"]["initpipeline.generation.id"] == generation.pk


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on loopback: POST /v1/traces, protobuf."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.server.spans.append(
                        {
                            "name": span.name,
                            "scope": scope.scope.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex() or None,
                            "attributes": {
                                a.key: a.value.WhichOneof("value")
                                and getattr(a.value, a.value.WhichOneof("value"))
                                for a in span.attributes
                            },
                        }
                    )
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_otlp_export_nests_phases_under_celerys_own_spans(stack: Stack, receiver: Receiver) -> None:
    stack.env.update(
        INITPIPELINE_TEST_TRACING=receiver.endpoint, INITPIPELINE_TEST_TRACING_CELERY="1"
    )
    stack.start_worker()
    assert stack.manage("start_init").returncode == 0
    run = stack.ended(PipelineRun.objects.get())
    assert run.state == "succeeded", run.error

    def exported() -> list[dict[str, Any]]:
        return [s for s in receiver.spans if s["name"] == "finish_run"]

    wait_for(exported, 30)
    spans = {s["span_id"]: s for s in receiver.spans}
    (root,) = [s for s in spans.values() if s["name"] == "start_init"]
    assert root["parent"] is None
    assert root["attributes"]["initpipeline.run.id"] == run.pk

    def ancestors(span: dict[str, Any]) -> list[str]:
        names = []
        while span["parent"] is not None:
            span = spans[span["parent"]]
            names.append(span["name"])
        return names

    # Celery's instrumentation made its spans in the run's trace, from start_init's send on:
    # each phase is the child of its task's run/ span, which follows the apply_async/ span
    # of the send that made it, back to the root.
    ours = [s for s in spans.values() if s["scope"] == "initpipeline"]
    assert sorted(s["name"] for s in ours) == [
        "finish_run",
        "phase a",
        "phase b",
        "phase c",
        "start_init",
    ]
    assert {s["trace_id"] for s in spans.values()} == {root["trace_id"]}
    for span in ours:
        if span is root:
            continue
        chain = ancestors(span)
        assert chain[0].startswith("run/initpipeline."), chain
        assert chain[1].startswith("apply_async/initpipeline."), chain
        assert chain[-1] == "start_init", chain
    (a,) = [s for s in ours if s["name"] == "phase a"]
    assert ancestors(a) == [
        "run/initpipeline.run_phase",
        "apply_async/initpipeline.run_phase",
        "start_init",
    ]
