"""OpenTelemetry in every process of tests/test_tracing.py (the start_init command, a worker
and its pool processes), set up as a project would: a tracer provider with the SDK.

tests/settings.py calls install() when INITPIPELINE_TEST_TRACING is set:
  memory     the SDK's in-memory exporter; each finished span is then appended to
             $INITPIPELINE_TEST_SPANS/spans-<pid>.jsonl (its to_json()), so that the test
             reads what every process exported
  http://... the OTLP/HTTP exporter, to that endpoint (the test's own receiver)
With INITPIPELINE_TEST_TRACING_CELERY=1, opentelemetry-instrumentation-celery too,
initialised in each pool process (worker_process_init), as its documentation asks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class Dump(SpanProcessor):
    """After the in-memory exporter got a span: write what it holds to this process's file."""

    def __init__(self, exporter: InMemorySpanExporter, folder: Path) -> None:
        self.exporter = exporter
        self.folder = folder

    def on_end(self, span: ReadableSpan) -> None:
        spans = self.exporter.get_finished_spans()
        self.exporter.clear()
        with open(self.folder / f"spans-{os.getpid()}.jsonl", "a") as out:
            for s in spans:
                out.write(json.dumps(json.loads(s.to_json())) + "\n")


def install(mode: str) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "initpipeline-tests"}))
    if mode == "memory":
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        provider.add_span_processor(Dump(exporter, Path(os.environ["INITPIPELINE_TEST_SPANS"])))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=mode)))
    trace.set_tracer_provider(provider)
    if os.environ.get("INITPIPELINE_TEST_TRACING_CELERY") == "1":
        if "worker" in sys.argv:
            from celery.signals import worker_process_init

            worker_process_init.connect(_instrument, weak=False)
        else:
            _instrument()


def _instrument(**kwargs: Any) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument()
