"""Run records for tests without a worker: fixed times for exact output, or live rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.db import transaction
from django.utils import timezone

from initpipeline import outcomes, storage
from initpipeline.models import IN_FLIGHT, Artifact, Generation, PhaseRun, PipelineRun
from initpipeline.registry import get_pipeline

T0 = datetime(2025, 3, 4, 10, 0, 0, tzinfo=UTC)


@dataclass
class Phase:
    """A phase record: ``start`` and ``took`` in seconds after the run's ``at``."""

    name: str
    state: str = "succeeded"
    reason: str = ""
    start: float | None = None
    took: float | None = None
    attempt: int | None = None
    max_attempts: int = 1
    done: float = 0
    total: float | None = None
    message: str = ""
    error: str = ""
    traceback: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def make_run(
    state: str,
    phases: list[Phase],
    *,
    at: datetime = T0,
    trigger: str = "start_init",
    error: str = "",
    finished_after: float | None = None,
) -> PipelineRun:
    started = [p.start for p in phases if p.start is not None]
    ends = [p.start + p.took for p in phases if p.start is not None and p.took is not None]
    finished_at = None
    if state not in IN_FLIGHT:
        finished_at = at + timedelta(seconds=finished_after or max(ends, default=0))
    run = PipelineRun.objects.create(
        state=state,
        created_at=at,
        started_at=at + timedelta(seconds=min(started)) if started else None,
        finished_at=finished_at,
        trigger=trigger,
        error=error,
    )
    for position, p in enumerate(phases):
        begun = at + timedelta(seconds=p.start) if p.start is not None else None
        # One after the other, unless ``extra`` says what the phase waits for.
        extra = {"depends_on": [phases[position - 1].name] if position else [], **p.extra}
        PhaseRun.objects.create(
            run=run,
            name=p.name,
            position=position,
            state=p.state,
            reason=p.reason,
            fingerprint=f"fp-{p.name}",
            version="1",
            attempt=p.attempt if p.attempt is not None else (1 if begun else 0),
            max_attempts=p.max_attempts,
            progress_done=p.done,
            progress_total=p.total,
            message=p.message,
            started_at=begun,
            heartbeat_at=begun,
            finished_at=begun + timedelta(seconds=p.took)
            if begun is not None and p.took is not None
            else None,
            error=p.error,
            traceback=p.traceback,
            **extra,  # type: ignore[arg-type]
        )
    return run


def _file_of_size(name: str, size: int) -> str:
    """A file of ``size`` zero bytes under its content-addressed key (every file under the
    artifacts folder is named by its digest: tests/test_recovery.py's reader checks it)."""
    from initpipeline import digests

    data = b"\0" * size
    hasher = digests.new()
    hasher.update(data)
    key = f"{name}/{digests.name_part(digests.of(hasher, digests.DEFAULT))}.bin"
    path = Path(storage.get_storage().path("")) / key
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return key


def make_generation(
    run: PipelineRun, artifacts: list[tuple[str, str, int]], *, active: bool = True
) -> Generation:
    """A generation of ``run`` with artifacts (name, format, size); the digest is derived.
    Each has a file of its size under its key (what readiness and init_status look at),
    never hashed by these tests."""
    records = []
    for name, fmt, size in artifacts:
        key = _file_of_size(name, size)
        phase_run = run.phases.filter(name=name.removesuffix("_out")).first()
        records.append(
            Artifact.objects.create(
                name=name,
                fingerprint=f"fp-{name}",
                storage_key=key,
                digest="blake3:" + (name.encode().hex() * 64)[:64],
                size=size,
                format=fmt,
                run=run,
                phase_run=phase_run,
                created_at=run.finished_at or T0,
            )
        )
    if active:
        Generation.objects.filter(is_active=True).update(is_active=False)
    generation = Generation.objects.create(
        run=run,
        fingerprints={p.name: p.fingerprint for p in run.phases.all()},
        is_active=active,
        activated_at=run.finished_at if active else None,
    )
    generation.artifacts.set(records)
    return generation


# -- live records of tests/testapp's pipeline a -> b -> c, timed from now -------------------

Sent = list[tuple[int, list[str]]]


def ago(seconds: float) -> datetime:
    return timezone.now() - timedelta(seconds=seconds)


def live_run(run_state: str = "running", **phases: dict[str, Any]) -> PipelineRun:
    """A run of the test pipeline a -> b -> c; ``phases`` override each phase's fields."""
    pipeline = get_pipeline()
    fingerprints = pipeline.fingerprints()
    run = PipelineRun.objects.create(state=run_state, started_at=ago(60), created_at=ago(60))
    for position, name in enumerate(pipeline.order()):
        fields: dict[str, Any] = {"state": "pending", "max_attempts": 3, "timeout": 60}
        fields.update(phases.get(name, {}))
        PhaseRun.objects.create(
            run=run,
            name=name,
            position=position,
            fingerprint=fingerprints[name],
            depends_on=pipeline.dependencies(name),
            **fields,
        )
    return run


def done(seconds_ago: float = 30) -> dict[str, Any]:
    """The fields of a phase that succeeded ``seconds_ago``."""
    return {
        "state": "succeeded",
        "attempt": 1,
        "lease": 1,
        "started_at": ago(seconds_ago + 1),
        "heartbeat_at": ago(seconds_ago),
        "finished_at": ago(seconds_ago),
    }


def running(heartbeat_ago: float, attempt: int = 1, task_id: str = "task-1") -> dict[str, Any]:
    """The fields of a running phase whose last heartbeat was ``heartbeat_ago`` seconds ago."""
    return {
        "state": "running",
        "attempt": attempt,
        "lease": attempt,
        "task_id": task_id,
        "worker": "w1@host",
        "started_at": ago(heartbeat_ago + 1),
        "heartbeat_at": ago(heartbeat_ago),
    }


def record_artifacts(run: PipelineRun, *names: str) -> None:
    """Artifact records, with real files, for the named phases of ``run``."""
    for pr in run.phases.filter(name__in=names):
        produced = get_pipeline()[pr.name].produces[0]
        path = storage.new_scratch_path(".json")
        path.write_bytes(f'{{"phase": "{pr.name}", "run": {run.pk}}}'.encode())
        pub = storage.publish(path, name=produced, suffix=".json")
        Artifact.objects.create(
            name=produced,
            fingerprint=pr.fingerprint,
            storage_key=pub.key,
            digest=pub.digest,
            size=pub.size,
            format="json",
            run=run,
            phase_run=pr,
        )


def phase_of(run: PipelineRun, name: str) -> PhaseRun:
    return PhaseRun.objects.get(run=run, name=name)


# -- generations of real files, as a run would publish them --------------------------------


def publish_generation(**artifacts: tuple[str, Any]) -> Generation:
    """Publish each artifact (name=(format, value)) as a run would, and make a new
    generation of them active: format "json", "npy", "pickle", "bytes", or "dir" (value:
    a folder)."""
    from pathlib import Path

    import numpy as np

    from initpipeline import formats

    run = PipelineRun.objects.create(state="succeeded", finished_at=timezone.now())
    writers = {
        "json": formats.write_json,
        "npy": lambda path, value: formats.write_npy(path, np.asarray(value)),
        "pickle": formats.write_pickle,
        "bytes": formats.write_bytes,
        "dir": lambda path, value: formats.write_dir(path, Path(value)),
    }
    records = []
    for name, (fmt, value) in artifacts.items():
        path = storage.new_scratch_path(formats.SUFFIX[fmt])
        writers[fmt](path, value)
        published = storage.publish(path, name=name, suffix=formats.SUFFIX[fmt])
        records.append(
            Artifact.objects.create(
                name=name,
                fingerprint=published.digest.partition(":")[2],  # 64 characters
                storage_key=published.key,
                digest=published.digest,
                size=published.size,
                format=fmt,
                run=run,
            )
        )
    # As outcomes.activate does: in one transaction, so that a loader thread polling the
    # active generation never sees none, or one without its artifacts.
    with transaction.atomic():
        generation = Generation.objects.create(run=run)
        generation.artifacts.set(records)
        Generation.objects.filter(is_active=True).update(is_active=False)
        generation.is_active = True
        generation.activated_at = timezone.now()
        generation.save(update_fields=["is_active", "activated_at"])
    return generation


def web_process(
    pid: int,
    generation: Generation | None,
    *,
    host: str = "web-1",
    server: str = "gunicorn 100",
    serves: tuple[str, ...] = ("model",),
    loading: dict[str, Any] | None = None,
    failures: dict[str, Any] | None = None,
    reported_ago: float = 5,
) -> Any:
    """The WebProcess row of a worker that serves ``generation``'s artifacts."""
    from initpipeline.models import WebProcess

    at = timezone.now() - timedelta(seconds=reported_ago)
    gen = generation.pk if generation is not None else None
    return WebProcess.objects.create(
        key=f"{host}:{pid}:1",
        host=host,
        pid=pid,
        server=server,
        state="serving",
        generation_id=gen,
        serves={
            n: {
                "digest": "blake3:" + "0" * 64,
                "generation": gen,
                "seconds": 1.5,
                "at": 0,
                "loaded": True,
            }
            for n in serves
        },
        loading=loading or {"target": None, "since": {}},
        failures=failures or {},
        started_at=at,
        reported_at=at,
    )


# -- a sharded phase in flight: what one shard's success costs ----------------------------


def sharded_run(count: int) -> PipelineRun:
    """numbers -> squares (``count`` shards, all running) -> total, as start() records it."""
    now = timezone.now()
    run = PipelineRun.objects.create(state="running", started_at=now)
    shard_names = [f"squares#{i}" for i in range(count)]
    rows = [PhaseRun(name="numbers", state="succeeded")]
    rows += [
        PhaseRun(
            name=name,
            depends_on=["numbers"],
            state="running",
            shard_of="squares",
            shard_index=i,
            shard_count=count,
            attempt=1,
            lease=1,
            started_at=now,
            heartbeat_at=now,
        )
        for i, name in enumerate(shard_names)
    ]
    rows += [
        PhaseRun(name="squares", depends_on=shard_names, shard_count=count),
        PhaseRun(name="total", depends_on=["squares"]),
    ]
    for position, pr in enumerate(rows):
        pr.run, pr.position, pr.fingerprint = run, position, f"fp-{pr.name}"
    PhaseRun.objects.bulk_create(rows)
    return run


def shard_parts(index: int, count: int) -> dict[str, tuple[storage.Published, str, dict[str, Any]]]:
    """What shard ``index`` of a sharded_run() publishes: one part."""
    part = f"squares.shard-{index:04d}-of-{count:04d}"
    return {part: (storage.Published(f"{part}/x.json", "blake3:" + "1" * 64, 2), "json", {})}


_FETCHES = ("fetchone", "fetchmany", "fetchall")


@contextmanager
def rows_read() -> Iterator[list[int]]:
    """How many rows the database hands back inside the block (one number: ``[n]``)."""
    from django.db.backends import utils

    counted = [0]
    originals = {name: getattr(utils.CursorWrapper, name, None) for name in _FETCHES}

    def counting(name: str) -> Any:
        def fetch(self: Any, *args: Any) -> Any:
            got = getattr(self.cursor, name)(*args)
            counted[0] += (1 if got is not None else 0) if name == "fetchone" else len(got)
            return got

        return fetch

    for name in _FETCHES:
        setattr(utils.CursorWrapper, name, counting(name))
    try:
        yield counted
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(utils.CursorWrapper, name)
            else:
                setattr(utils.CursorWrapper, name, original)


def shard_success_cost(count: int) -> tuple[int, int]:
    """(queries, rows read) of the success of one shard of ``count`` that leaves others
    running, so that it unblocks nothing. Ends the run it made (one run in flight)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    run = sharded_run(count)
    pr = PhaseRun.objects.get(run=run, name="squares#0")
    with CaptureQueriesContext(connection) as queries, rows_read() as rows:
        assert outcomes.record_succeeded(pr, shard_parts(0, count), 1.0, advance=True)
    PipelineRun.objects.filter(pk=run.pk).update(state="cancelled")
    return len(queries), rows[0]
