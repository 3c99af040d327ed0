"""Settings of the benchmark processes: the demo project on its own var folder."""

import os
from pathlib import Path

_BASE = Path(__file__).resolve().parent.parent
os.environ.setdefault("INITPIPELINE_VAR_DIR", str(_BASE / "var" / "bench"))

from project.settings import *  # noqa: E402,F403
from project.settings import INITPIPELINE  # noqa: E402

ROOT_URLCONF = "bench.urls"
DEBUG = False
INITPIPELINE = {**INITPIPELINE, "REFRESH_INTERVAL": 2.0}
# Benchmarks measure the server, not the access log.
LOGGING = {"version": 1, "disable_existing_loggers": False}

# python -m bench --only monitoring: a deploy whose every process exports its spans over
# OTLP/HTTP to the bench's receiver, as a project that configured OpenTelemetry would.
if os.environ.get("INITPIPELINE_BENCH_OTLP"):
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    _provider = TracerProvider(resource=Resource.create({"service.name": "initpipeline-bench"}))
    _provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=os.environ["INITPIPELINE_BENCH_OTLP"]))
    )
    trace.set_tracer_provider(_provider)
