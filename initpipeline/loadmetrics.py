"""Prometheus series of this process's artifact loads, written by serving.py's loader thread.

Under Gunicorn each worker is a process of its own: prometheus-client's multiprocess mode
adds the workers' series up when ``PROMETHEUS_MULTIPROC_DIR`` is set in Gunicorn's
environment (gunicorn.py empties the folder at start and forgets a worker that ended).
metrics.py serves them beside the records' series. Apart from metrics.py, so that the loader
thread imports prometheus-client alone, not the records' queries.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.registry import Collector

#: prometheus-client's multiprocess folder (gunicorn.py names it too: it must not import
#: prometheus-client in the master).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# registry=None: created once per process, written by serving.py, and collected either by
# the registries metrics.register() adds them to, or (multiprocess mode) from their files by a
# MultiProcessCollector, which must then be the only one to report them.

#: From a small JSON (milliseconds) to an hour-long model load.
LOAD_BUCKETS = (0.01, 0.05, 0.25, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)

LOAD_SECONDS = Histogram(
    "initpipeline_artifact_load_duration_seconds",
    "Seconds this process took to verify, load and warm up an artifact (its count: loads).",
    ["artifact"],
    buckets=LOAD_BUCKETS,
    registry=None,
)
LOADED_BYTES = Counter(
    "initpipeline_artifact_loaded_bytes",
    "Bytes of the artifacts this process loaded (the files' sizes).",
    ["artifact"],
    registry=None,
)
LOAD_FAILURES = Counter(
    "initpipeline_artifact_load_failures",
    "Loads of an artifact that failed in this process (each is tried again with backoff).",
    ["artifact"],
    registry=None,
)
LOAD_FAILING = Gauge(
    "initpipeline_artifact_load_failing",
    "1 while this process's last load of an artifact failed (it is tried again with "
    "backoff), 0 once it loaded.",
    ["artifact"],
    # The worst live process: one worker that cannot load it is enough to say so.
    multiprocess_mode="livemax",
    registry=None,
)
SERVING_GENERATION = Gauge(
    "initpipeline_serving_generation",
    "The generation whose artifacts this process serves (0: none yet).",
    # One series per live process (label pid): a worker left behind on an old generation
    # shows; the series of a worker that ended goes with its child_exit.
    multiprocess_mode="liveall",
    registry=None,
)

LOADING = Gauge(
    "initpipeline_artifact_loading",
    "1 while this process loads an artifact (verify, load, warm-up), else 0.",
    ["artifact"],
    # Summed over a server's live workers: how many of them load it now.
    multiprocess_mode="livesum",
    registry=None,
)
SERVING_READY = Gauge(
    "initpipeline_serving_ready",
    "1 when this process serves every required artifact (its part of /init/readyz), else 0.",
    multiprocess_mode="liveall",
    registry=None,
)

PROCESS_METRICS: tuple[Collector, ...] = (
    LOAD_SECONDS,
    LOADED_BYTES,
    LOAD_FAILURES,
    LOAD_FAILING,
    LOADING,
    SERVING_GENERATION,
    SERVING_READY,
)


def observe_loading(name: str, loading: bool) -> None:
    """serving.py: this process starts (True) or ends (False) a load of ``name``."""
    LOADING.labels(artifact=name).set(1 if loading else 0)


def observe_load(name: str, seconds: float, size: int) -> None:
    """serving.py: this process loaded (and warmed) artifact ``name``."""
    LOAD_SECONDS.labels(artifact=name).observe(seconds)
    LOADED_BYTES.labels(artifact=name).inc(max(size, 0))
    LOAD_FAILING.labels(artifact=name).set(0)


def observe_failure(name: str) -> None:
    """serving.py: a load of artifact ``name`` failed in this process."""
    LOAD_FAILURES.labels(artifact=name).inc()
    LOAD_FAILING.labels(artifact=name).set(1)


def observe_serving(generation: int | None, ready: bool) -> None:
    """serving.py: this process now serves ``generation``; ``ready``: every required
    artifact."""
    SERVING_GENERATION.set(generation or 0)
    SERVING_READY.set(1 if ready else 0)


def multiprocess_dir() -> str | None:
    """The multiprocess folder of this process (prometheus-client read it at import)."""
    return os.environ.get(MULTIPROC_ENV) or None
