"""Prometheus metrics: the init's records, read at scrape time, and what this process loads.

Two kinds of series (README "Monitoring" lists them all):

- **From the records** (``InitPipelineCollector``): readiness, the active generation, the
  latest run and each of its phases, read in two queries whenever Prometheus scrapes, in
  whichever process answers. Every process, every Gunicorn worker, every host tells the
  same truth: no state is kept here, and no multiprocess folder is needed for them.
- **Of this process** (loadmetrics.py: ``LOAD_SECONDS``, ``LOADED_BYTES``,
  ``LOAD_FAILURES``, ``LOAD_FAILING``, ``LOADING``, ``SERVING_GENERATION``,
  ``SERVING_READY``): what a web process's loader thread did (serving.py). Under
  Gunicorn each worker is a process of its own, so a scrape reaching one worker would see
  only its numbers: prometheus-client's multiprocess mode adds them up across the workers
  of a server when ``PROMETHEUS_MULTIPROC_DIR`` is set in Gunicorn's environment
  (gunicorn.py empties the folder at start and forgets a worker that ended).

Use the view ``/init/metrics`` (views.metrics, in initpipeline.urls), or ``register(registry)``
to add them to a registry you already serve (django-prometheus' ``/metrics``).

Needs the ``metrics`` extra (``pip install "initpipeline[metrics]"``); nothing else in the
package imports this module unless metrics are asked for.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import DateTimeField, F, OuterRef, Subquery
from django.utils import timezone
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from . import history
from .conf import settings
from .loadmetrics import PROCESS_METRICS, multiprocess_dir
from .models import (
    PHASE_ENDED,
    Artifact,
    PhaseRun,
    PhaseState,
    PipelineRun,
    RunState,
)
from .registry import required_artifacts

logger = logging.getLogger("initpipeline")

# -- the records, at scrape time -------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """A phase run of the latest run, with how long its name took the last time it ran."""

    row: PhaseRun
    previous: float | None


def _latest_rows() -> tuple[PipelineRun | None, list[_Row]]:
    """The latest run's phase runs (with the run, and each name's last real duration before
    it, as history.previous_timings defines it): one query."""
    latest = PipelineRun.objects.latest_first().values("pk")[:1]
    earlier = (
        PhaseRun.objects.filter(
            name=OuterRef("name"),
            state=PhaseState.SUCCEEDED,
            run__created_at__lt=OuterRef("run__created_at"),
            started_at__isnull=False,
            finished_at__isnull=False,
        )
        .exclude(run=OuterRef("run"))
        .order_by("-finished_at", "-id")
    )
    rows = list(
        PhaseRun.objects.filter(run_id=Subquery(latest))
        .select_related("run")
        .annotate(
            previous_started=Subquery(
                earlier.values("started_at")[:1], output_field=DateTimeField()
            ),
            previous_finished=Subquery(
                earlier.values("finished_at")[:1], output_field=DateTimeField()
            ),
        )
        .order_by("position")
    )
    if not rows:
        return None, []
    out = []
    for pr in rows:
        began: datetime | None = getattr(pr, "previous_started", None)
        ended: datetime | None = getattr(pr, "previous_finished", None)
        took = None
        if began is not None and ended is not None:
            took = max((ended - began).total_seconds(), 0.0)
        out.append(_Row(pr, took))
    return rows[0].run, out


def _active_artifacts() -> list[dict[str, Any]]:
    """The active generation's artifacts, with the generation's id and activation: one query."""
    return [
        dict(row)
        for row in Artifact.objects.filter(generations__is_active=True)
        .annotate(generation_id=F("generations__id"), activated_at=F("generations__activated_at"))
        .values("name", "size", "digest", "format", "generation_id", "activated_at")
        .order_by("name")
    ]


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


@dataclass
class _Phase:
    """One phase of the latest run: its own row and, for a sharded phase, its shards'."""

    own: PhaseRun
    previous: float | None
    shards: list[_Row]

    def rows(self) -> list[PhaseRun]:
        return [self.own, *(s.row for s in self.shards)]

    @property
    def state(self) -> str:
        """Its own row's state; a sharded phase whose shards run counts as running (its own
        row, the merge, waits for them)."""
        own = self.own.state
        if own == PhaseState.PENDING and any(
            s.row.state == PhaseState.RUNNING for s in self.shards
        ):
            return PhaseState.RUNNING
        return own

    @property
    def progress(self) -> float:
        """As the reports say (reporting.PhaseReport.with_shards)."""
        own = self.own.progress
        if self.own.state in (PhaseState.SUCCEEDED, PhaseState.CACHED) or not self.shards:
            return own
        return (sum(s.row.progress for s in self.shards) + own) / (len(self.shards) + 1)

    @property
    def started_at(self) -> datetime | None:
        starts = [r.started_at for r in self.rows() if r.started_at is not None]
        return min(starts) if starts else None

    def duration(self, now: datetime) -> float | None:
        started = self.started_at
        if started is None:
            return None
        end = self.own.finished_at if self.own.state in PHASE_ENDED else None
        return max(((end or now) - started).total_seconds(), 0.0)

    @property
    def previous_duration(self) -> float | None:
        """Its last real duration: a sharded phase's, its slowest shard's and its merge's."""
        if not self.shards:
            return self.previous
        shards = [s.previous for s in self.shards]
        if self.previous is None or any(s is None for s in shards):
            return None
        return max(s for s in shards if s is not None) + self.previous

    def heartbeat_age(self, now: datetime) -> float | None:
        """Seconds since the stalest running row of the phase beat (None: none runs)."""
        ages = [r.heartbeat_age(now) for r in self.rows() if r.state == PhaseState.RUNNING]
        return max(ages) if ages else None


def _phases(rows: Sequence[_Row]) -> list[_Phase]:
    shards: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        if r.row.shard_of:
            shards[r.row.shard_of].append(r)
    return [
        _Phase(r.row, r.previous, shards.get(r.row.name, [])) for r in rows if not r.row.shard_of
    ]


class InitPipelineCollector(Collector):
    """The init's records as Prometheus series, read at each scrape (two queries).

    ``shards``: a series per shard of a sharded phase too (label ``shard``); None reads
    ``INITPIPELINE["METRICS_SHARDS"]`` at each scrape. Without them, a sharded phase's
    shards are counted by state (``initpipeline_phase_shards``) and summed into its
    phase's series: 1,000 shards do not make 1,000 series of each name.
    """

    def __init__(self, *, shards: bool | None = None) -> None:
        self.shards = shards

    def describe(self) -> Iterable[Metric]:
        # Registering must not query the database (a registry checks names at register()).
        return []

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        run, rows = _latest_rows()
        artifacts = _active_artifacts()
        yield from self._generation(artifacts)
        if run is not None:
            yield from self._run(run, rows, now)

    # -- readiness and the active generation ------------------------------------------------

    def _generation(self, artifacts: list[dict[str, Any]]) -> Iterator[Metric]:
        names = {a["name"] for a in artifacts}
        ready = GaugeMetricFamily(
            "initpipeline_ready",
            "1 when the active generation holds every required artifact (REQUIRED_ARTIFACTS, "
            "else every artifact of the pipeline), else 0.",
            value=float(bool(artifacts) and set(required_artifacts()) <= names),
        )
        yield ready
        if not artifacts:
            return
        first = artifacts[0]
        yield GaugeMetricFamily(
            "initpipeline_active_generation_id",
            "The id of the active generation.",
            value=float(first["generation_id"]),
        )
        activated = _ts(first["activated_at"])
        if activated is not None:
            yield GaugeMetricFamily(
                "initpipeline_active_generation_activated_timestamp_seconds",
                "When the active generation was activated (Unix time).",
                value=activated,
            )
        sizes = GaugeMetricFamily(
            "initpipeline_artifact_size_bytes",
            "Size of each artifact of the active generation.",
            labels=["artifact"],
        )
        for a in artifacts:
            sizes.add_metric([a["name"]], float(a["size"]))
        yield sizes
        info = GaugeMetricFamily(
            "initpipeline_artifact_info",
            "Each artifact of the active generation: its digest (with its algorithm) and "
            "format, as labels; always 1.",
            labels=["artifact", "digest", "format"],
        )
        for a in artifacts:
            info.add_metric([a["name"], a["digest"], a["format"]], 1.0)
        yield info

    # -- the latest run ---------------------------------------------------------------------

    def _run(self, run: PipelineRun, rows: list[_Row], now: datetime) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "initpipeline_run_id", "The id of the latest run.", value=float(run.pk)
        )
        state = GaugeMetricFamily(
            "initpipeline_run_state",
            "The latest run's state: 1 for the state it is in, 0 for the others.",
            labels=["state"],
        )
        for value in RunState.values:
            state.add_metric([value], float(run.state == value))
        yield state
        for name, when, doc in (
            ("created", run.created_at, "When start_init created the latest run"),
            ("start", run.started_at, "When the latest run's first phase started"),
            ("end", run.finished_at, "When the latest run ended"),
        ):
            stamp = _ts(when)
            if stamp is not None:
                yield GaugeMetricFamily(
                    f"initpipeline_run_{name}_timestamp_seconds", f"{doc} (Unix time).", value=stamp
                )
        duration = run.duration if run.started_at is not None else None
        if duration is not None:
            yield GaugeMetricFamily(
                "initpipeline_run_duration_seconds",
                "Seconds the latest run has taken since its first phase started (so far, "
                "while in flight).",
                value=max(duration, 0.0),
            )
        timings = {r.row.name: r.previous for r in rows if r.previous is not None}
        plain = [r.row for r in rows]
        expected = history.expected_duration(plain, timings)
        if expected is not None:
            yield GaugeMetricFamily(
                "initpipeline_run_expected_duration_seconds",
                "What the latest run's phases took the last time each ran for real, along "
                "the run's longest path (cached phases count 0); absent when one never ran.",
                value=expected,
            )
        phases = _phases(rows)
        yield GaugeMetricFamily(
            "initpipeline_run_progress_ratio",
            "The latest run's progress, from 0 to 1: the mean of its phases'.",
            value=round(history.overall_progress(phases), 6),
        )
        remaining = history.estimate_remaining(run, plain, timings=timings, now=now)
        if remaining is not None:
            yield GaugeMetricFamily(
                "initpipeline_run_estimated_remaining_seconds",
                "Seconds the latest run has left, from each phase's last real duration (0 "
                "once it succeeded; absent when unknown, failed or cancelled).",
                # As init_status rounds it (reporting.run_report).
                value=round(remaining, 1),
            )
        yield from self._phases(phases, now)
        if self._per_shard():
            yield from self._shards(phases, now)

    def _per_shard(self) -> bool:
        return settings.METRICS_SHARDS if self.shards is None else self.shards

    def _phases(self, phases: list[_Phase], now: datetime) -> Iterator[Metric]:
        labels = ["phase"]
        state = GaugeMetricFamily(
            "initpipeline_phase_state",
            "Each phase's state in the latest run: 1 for its state, 0 for the others.",
            labels=["phase", "state"],
        )
        progress = GaugeMetricFamily(
            "initpipeline_phase_progress_ratio",
            "Each phase's progress in the latest run, from 0 to 1 (a sharded phase's counts "
            "its shards' and its merge's).",
            labels=labels,
        )
        attempts = CounterMetricFamily(
            "initpipeline_phase_attempts",
            "Attempts of each phase in the latest run (failures and timeouts start a new "
            "one; a sharded phase's is its tasks' highest). Starts again with each run.",
            labels=labels,
        )
        losses = CounterMetricFamily(
            "initpipeline_phase_losses",
            "Times each phase lost its worker in the latest run (LOST_LIMIT; a sharded "
            "phase's: its tasks' sum). Starts again with each run.",
            labels=labels,
        )
        handoffs = CounterMetricFamily(
            "initpipeline_phase_handoffs",
            "Times a worker shutting down handed each phase back in the latest run (a "
            "sharded phase's: its tasks' sum). Starts again with each run.",
            labels=labels,
        )
        heartbeat = GaugeMetricFamily(
            "initpipeline_phase_heartbeat_age_seconds",
            "Seconds since each running phase last beat (a sharded phase's: its stalest "
            "running task's); a phase silent for STALE_AFTER counts as lost.",
            labels=labels,
        )
        duration = GaugeMetricFamily(
            "initpipeline_phase_duration_seconds",
            "Seconds each phase of the latest run has taken (so far, while it runs).",
            labels=labels,
        )
        previous = GaugeMetricFamily(
            "initpipeline_phase_previous_duration_seconds",
            "Seconds each phase took the last time it ran for real (succeeded, not cached), "
            "before the latest run.",
            labels=labels,
        )
        shards = GaugeMetricFamily(
            "initpipeline_phase_shards",
            "Shards of each sharded phase of the latest run, by state.",
            labels=["phase", "state"],
        )
        for p in phases:
            name = p.own.name
            current = p.state
            for value in PhaseState.values:
                state.add_metric([name, value], float(current == value))
            progress.add_metric([name], round(p.progress, 6))
            rows = p.rows()
            attempts.add_metric([name], float(max(r.attempt for r in rows)))
            losses.add_metric([name], float(sum(r.losses for r in rows)))
            handoffs.add_metric([name], float(sum(r.handoffs for r in rows)))
            age = p.heartbeat_age(now)
            if age is not None:
                heartbeat.add_metric([name], age)
            took = p.duration(now)
            if took is not None:
                duration.add_metric([name], took)
            before = p.previous_duration
            if before is not None:
                previous.add_metric([name], before)
            if p.own.shard_count is not None and p.shards:
                counts: dict[str, int] = defaultdict(int)
                for s in p.shards:
                    counts[s.row.state] += 1
                for value in PhaseState.values:
                    shards.add_metric([name, value], float(counts[value]))
        yield from (state, progress, attempts, losses, handoffs, heartbeat, duration, previous)
        if shards.samples:
            yield shards

    def _shards(self, phases: list[_Phase], now: datetime) -> Iterator[Metric]:
        labels = ["phase", "shard"]
        progress = GaugeMetricFamily(
            "initpipeline_shard_progress_ratio",
            "Each shard's progress in the latest run, from 0 to 1 (METRICS_SHARDS).",
            labels=labels,
        )
        attempts = CounterMetricFamily(
            "initpipeline_shard_attempts",
            "Attempts of each shard in the latest run.",
            labels=labels,
        )
        losses = CounterMetricFamily(
            "initpipeline_shard_losses", "Times each shard lost its worker.", labels=labels
        )
        handoffs = CounterMetricFamily(
            "initpipeline_shard_handoffs", "Times each shard was handed back.", labels=labels
        )
        heartbeat = GaugeMetricFamily(
            "initpipeline_shard_heartbeat_age_seconds",
            "Seconds since each running shard last beat.",
            labels=labels,
        )
        for p in phases:
            for s in p.shards:
                key = [p.own.name, str(s.row.shard_index)]
                progress.add_metric(key, round(s.row.progress, 6))
                attempts.add_metric(key, float(s.row.attempt))
                losses.add_metric(key, float(s.row.losses))
                handoffs.add_metric(key, float(s.row.handoffs))
                if s.row.state == PhaseState.RUNNING:
                    heartbeat.add_metric(key, s.row.heartbeat_age(now))
        yield from (progress, attempts, losses, handoffs, heartbeat)


# -- serving them --------------------------------------------------------------------------


def register(registry: CollectorRegistry = REGISTRY) -> None:
    """Add initpipeline's series to ``registry`` (prometheus-client's default one unless
    given): the records' collector, and this process's loading metrics unless multiprocess
    mode collects those from their files (then add a ``MultiProcessCollector`` to the
    registry you serve, as prometheus-client's documentation says)."""
    registry.register(InitPipelineCollector())
    if multiprocess_dir() is None:
        for metric in PROCESS_METRICS:
            registry.register(metric)


def scrape_registry() -> CollectorRegistry:
    """What ``/init/metrics`` serves: the records, and the loading metrics of every worker of
    this server (multiprocess mode) or of this process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InitPipelineCollector())
    if multiprocess_dir() is not None:
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for metric in PROCESS_METRICS:
            registry.register(metric)
    return registry


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The body and content type of a scrape (OpenMetrics when Prometheus asks for it)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(scrape_registry()), content_type


__all__ = [
    "InitPipelineCollector",
    "exposition",
    "register",
    "scrape_registry",
]
