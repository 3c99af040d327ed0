"""Start, execute, finish, cancel and report runs. Commands, tasks and the admin call these."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, close_old_connections, connection, transaction
from django.utils import timezone

from . import conf, storage
from .context import PhaseContext
from .exceptions import EnqueueError, PhaseCancelled, PipelineConfigError
from .models import (
    IN_FLIGHT,
    PHASE_DONE,
    Artifact,
    Generation,
    PhaseRun,
    PhaseState,
    PipelineRun,
    RunState,
)
from .registry import Pipeline, get_pipeline

logger = logging.getLogger("initpipeline")

UP_TO_DATE = "up_to_date"
ENQUEUED = "enqueued"
ATTACHED = "attached"


@dataclass(frozen=True)
class StartResult:
    """What ``start()`` did: ``outcome`` is up_to_date, enqueued or attached."""

    outcome: str
    run: PipelineRun | None
    generation: Generation | None = None


class RetryPhase(Exception):
    """The phase failed and has attempts left: the task re-sends itself after ``countdown``."""

    def __init__(self, countdown: float) -> None:
        super().__init__(countdown)
        self.countdown = countdown


class PhaseFailed(Exception):
    """The phase failed for good: the chain stops here."""


class PhaseSkipped(Exception):
    """This copy of the task must not run (duplicate delivery, run no longer in flight)."""


# -- planning and starting ----------------------------------------------------------------


def active_generation() -> Generation | None:
    return Generation.objects.filter(is_active=True).select_related("run").first()


def _cached(name: str, fingerprint: str, produces: Sequence[str]) -> bool:
    """True when every artifact of the phase exists with this fingerprint and verifies."""
    for artifact_name in produces:
        record = Artifact.objects.for_fingerprint(artifact_name, fingerprint).first()
        if record is None or not storage.is_valid(record):
            return False
    return True


def _forced(
    pipeline: Pipeline, *, force: bool, from_phase: str | None, only: Sequence[str]
) -> set[str]:
    if force:
        return set(pipeline.phases)
    forced: set[str] = set()
    if from_phase:
        pipeline[from_phase]
        forced |= {from_phase, *pipeline.descendants(from_phase)}
    for name in only:
        pipeline[name]
        forced.add(name)
    return forced


def start(
    *,
    force: bool = False,
    from_phase: str | None = None,
    only: Sequence[str] = (),
    trigger: str = "",
) -> StartResult:
    """Start the pipeline unless it is up to date or already running (single flight).

    Raises PipelineConfigError for an invalid pipeline or an unknown phase name, and
    EnqueueError when the broker refuses the tasks (the run is then marked failed).
    """
    pipeline = get_pipeline()
    pipeline.check()
    order = pipeline.order()
    fingerprints = pipeline.fingerprints()
    forced = _forced(pipeline, force=force, from_phase=from_phase, only=only)

    existing = PipelineRun.objects.in_flight().first()
    if existing is not None:
        return StartResult(ATTACHED, existing)

    active = active_generation()
    if (
        not forced
        and active is not None
        and active.fingerprints == fingerprints
        and all(storage.is_valid(a) for a in active.artifacts.all())
    ):
        return StartResult(UP_TO_DATE, None, active)

    # Verify caches before the write transaction: hashing large files must not hold
    # SQLite's write lock.
    cached = {
        name
        for name in order
        if name not in forced and _cached(name, fingerprints[name], pipeline.phases[name].produces)
    }
    options = {"force": force, "from": from_phase, "only": list(only)}
    try:
        with transaction.atomic():
            existing = PipelineRun.objects.in_flight().first()
            if existing is not None:
                return StartResult(ATTACHED, existing)
            run = PipelineRun.objects.create(trigger=trigger[:200], options=options)
            PhaseRun.objects.bulk_create(
                PhaseRun(
                    run=run,
                    name=name,
                    position=position,
                    fingerprint=fingerprints[name],
                    version=pipeline.phases[name].version,
                    forced=name in forced,
                    state=PhaseState.CACHED if name in cached else PhaseState.PENDING,
                    max_attempts=pipeline.phases[name].retries + 1,
                    timeout=_timeout(pipeline, name),
                    message="cached: fingerprint matches a verified artifact"
                    if name in cached
                    else "",
                )
                for position, name in enumerate(order)
            )
            to_run = [name for name in order if name not in cached]
            transaction.on_commit(lambda: _enqueue(run.pk, to_run))
    except IntegrityError:
        # Another start won the race between our check and our insert: the partial
        # unique index initpipeline_run_single_flight let exactly one through.
        existing = PipelineRun.objects.in_flight().first()
        if existing is None:
            raise
        return StartResult(ATTACHED, existing)
    run.refresh_from_db()
    if run.state == RunState.FAILED:
        raise EnqueueError(run.error)
    logger.info("run %s enqueued: %s", run.pk, ", ".join(to_run) or "nothing to run")
    return StartResult(ENQUEUED, run)


def _timeout(pipeline: Pipeline, name: str) -> int:
    return int(pipeline.phases[name].timeout or conf.get("DEFAULT_TIMEOUT"))


def _enqueue(run_id: int, names: Sequence[str]) -> None:
    if not names:
        # Every phase is cached (say, a rollback to an earlier configuration): no worker
        # is needed to switch generations.
        finish_run(run_id=run_id)
        return
    from celery import chain

    from . import tasks

    pipeline = get_pipeline()
    queue = conf.get("QUEUE")
    steps = []
    for name in names:
        timeout = _timeout(pipeline, name)
        # Immutable signatures: a step never receives the previous step's return value.
        limits: dict[str, Any] = {"soft_time_limit": timeout, "time_limit": timeout + 30}
        sig = tasks.run_phase.si(run_id, name).set(**limits)
        if queue:
            sig = sig.set(queue=queue)
        steps.append(sig)
    finish = tasks.finish_run.si(run_id)
    steps.append(finish.set(queue=queue) if queue else finish)
    try:
        chain(*steps).apply_async()
    except Exception as exc:
        logger.exception("could not enqueue run %s", run_id)
        reason = f"could not send the run's tasks to the broker: {type(exc).__name__}: {exc}"
        _end_run(run_id, RunState.FAILED, reason, phase_state=PhaseState.CANCELLED)


# -- executing a phase (inside a Celery worker) -------------------------------------------


class _Heartbeat(threading.Thread):
    """Writes the phase's heartbeat every HEARTBEAT_INTERVAL and watches for cancellation."""

    def __init__(self, phase_run_id: int, run_id: int, ctx: PhaseContext) -> None:
        super().__init__(name=f"initpipeline-heartbeat-{phase_run_id}", daemon=True)
        self.phase_run_id = phase_run_id
        self.run_id = run_id
        self.ctx = ctx
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = float(conf.get("HEARTBEAT_INTERVAL"))
        try:
            while not self.stopped.wait(interval):
                try:
                    PhaseRun.objects.filter(pk=self.phase_run_id).update(
                        heartbeat_at=timezone.now()
                    )
                    state = (
                        PipelineRun.objects.filter(pk=self.run_id)
                        .values_list("state", flat=True)
                        .first()
                    )
                    if state == RunState.CANCELLED:
                        self.ctx.cancelled.set()
                except Exception:
                    logger.exception("heartbeat of phase run %s failed", self.phase_run_id)
        finally:
            # Django connections are per thread: close this thread's own.
            connection.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


def _claim(run_id: int, phase_name: str, task_id: str, worker: str) -> PhaseRun:
    with transaction.atomic():
        pr = (
            PhaseRun.objects.select_for_update()
            .select_related("run")
            .get(run_id=run_id, name=phase_name)
        )
        run = pr.run
        if run.state not in IN_FLIGHT:
            raise PhaseSkipped(f"run {run_id} is {run.state}")
        if pr.state in PHASE_DONE:
            raise PhaseSkipped(f"phase {phase_name} is already {pr.state} (duplicate delivery)")
        if pr.state != PhaseState.PENDING and pr.state != PhaseState.RUNNING:
            raise PhaseSkipped(f"phase {phase_name} is {pr.state}")
        stale_after = float(conf.get("STALE_AFTER"))
        if (
            pr.state == PhaseState.RUNNING
            and pr.task_id != task_id
            and pr.heartbeat_at is not None
            and (timezone.now() - pr.heartbeat_at).total_seconds() < stale_after
        ):
            # At-least-once delivery (celery#5935): another copy is alive and working.
            raise PhaseSkipped(f"phase {phase_name} is running in task {pr.task_id}")
        now = timezone.now()
        pr.state = PhaseState.RUNNING
        pr.attempt += 1
        pr.task_id = task_id
        pr.worker = worker[:255]
        pr.started_at = pr.started_at or now
        pr.heartbeat_at = now
        pr.finished_at = None
        pr.save()
        if run.state == RunState.PENDING:
            run.state = RunState.RUNNING
            run.started_at = now
            run.save(update_fields=["state", "started_at"])
    return pr


def execute_phase(*, run_id: int, phase_name: str, task_id: str = "", worker: str = "") -> str:
    """Run one phase of a run and record the outcome; returns the phase's final state.

    Raises RetryPhase when it failed with attempts left, PhaseFailed when it failed for
    good (the run is then failed), PhaseSkipped when this delivery must not run it.
    """
    pipeline = get_pipeline()
    pr = _claim(run_id, phase_name, task_id, worker or socket.gethostname())
    try:
        phase = pipeline[phase_name]
    except PipelineConfigError as exc:
        _fail(pr, f"this worker does not know the phase: {exc}", "")
        raise PhaseFailed(str(exc)) from exc
    current = pipeline.fingerprints().get(phase_name)
    if current != pr.fingerprint:
        logger.warning(
            "phase %s: this worker's code has another fingerprint than the run planned "
            "(workers and the deploy step run different code or settings)",
            phase_name,
        )
    ctx = PhaseContext(phase=phase, phase_run=pr, pipeline=pipeline)
    beat = _Heartbeat(pr.pk, run_id, ctx)
    beat.start()
    started = time.monotonic()
    try:
        phase.func(ctx)
        published = ctx.published()
    except PhaseCancelled:
        beat.stop()
        PhaseRun.objects.filter(pk=pr.pk).update(
            state=PhaseState.CANCELLED, finished_at=timezone.now(), message="cancelled"
        )
        logger.info("phase %s of run %s stopped: run cancelled", phase_name, run_id)
        return PhaseState.CANCELLED
    except Exception as exc:
        beat.stop()
        tb = traceback.format_exc()
        error = f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ == "SoftTimeLimitExceeded":
            error = f"timed out after {pr.timeout} s ({error})"
        if pr.attempt < pr.max_attempts:
            countdown = backoff(pr.attempt)
            logger.warning(
                "phase %s attempt %d/%d failed (%s); retrying in %.1f s",
                phase_name,
                pr.attempt,
                pr.max_attempts,
                error,
                countdown,
            )
            PhaseRun.objects.filter(pk=pr.pk).update(
                state=PhaseState.PENDING,
                error=error,
                traceback=tb,
                message=f"attempt {pr.attempt} failed; retrying in {countdown:.0f} s",
            )
            raise RetryPhase(countdown) from exc
        logger.error("phase %s of run %s failed: %s\n%s", phase_name, run_id, error, tb)
        _fail(pr, error, tb)
        raise PhaseFailed(error) from exc
    beat.stop()
    with transaction.atomic():
        for name, (pub, fmt, metadata) in published.items():
            Artifact.objects.create(
                name=name,
                fingerprint=pr.fingerprint,
                storage_key=pub.key,
                sha256=pub.sha256,
                size=pub.size,
                format=fmt,
                metadata=metadata,
                run_id=run_id,
                phase_run=pr,
            )
        PhaseRun.objects.filter(pk=pr.pk).update(
            state=PhaseState.SUCCEEDED,
            finished_at=timezone.now(),
            progress_done=1,
            progress_total=1,
            error="",
            traceback="",
        )
    logger.info(
        "phase %s of run %s succeeded in %.2f s", phase_name, run_id, time.monotonic() - started
    )
    return PhaseState.SUCCEEDED


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter: a delay in [base*2^(n-1)/2, base*2^(n-1)]."""
    base = float(conf.get("RETRY_BACKOFF"))
    ceiling = min(float(conf.get("RETRY_BACKOFF_MAX")), base * float(2 ** max(attempt - 1, 0)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _fail(pr: PhaseRun, error: str, tb: str) -> None:
    now = timezone.now()
    with transaction.atomic():
        PhaseRun.objects.filter(pk=pr.pk).update(
            state=PhaseState.FAILED, error=error, traceback=tb, finished_at=now
        )
        PhaseRun.objects.filter(
            run_id=pr.run_id, position__gt=pr.position, state=PhaseState.PENDING
        ).update(state=PhaseState.UPSTREAM_FAILED, message=f"not run: {pr.name} failed")
        PipelineRun.objects.filter(pk=pr.run_id, state__in=IN_FLIGHT).update(
            state=RunState.FAILED, finished_at=now, error=f"phase {pr.name} failed: {error}"
        )


def _end_run(run_id: int, state: str, error: str, *, phase_state: str) -> None:
    now = timezone.now()
    with transaction.atomic():
        PhaseRun.objects.filter(
            run_id=run_id, state__in=[PhaseState.PENDING, PhaseState.RUNNING]
        ).update(state=phase_state, finished_at=now)
        PipelineRun.objects.filter(pk=run_id, state__in=IN_FLIGHT).update(
            state=state, finished_at=now, error=error
        )


# -- finishing ----------------------------------------------------------------------------


def finish_run(*, run_id: int) -> Generation | None:
    """Activate the run's generation in one transaction, if every phase is done."""
    with transaction.atomic():
        run = PipelineRun.objects.select_for_update().get(pk=run_id)
        if run.state not in IN_FLIGHT:
            logger.info("run %s is %s; nothing to activate", run_id, run.state)
            return None
        phases = list(run.phases.order_by("position"))
        not_done = [p.name for p in phases if p.state not in PHASE_DONE]
        if not_done:
            _end_run(
                run_id,
                RunState.FAILED,
                f"finished with phases not done: {', '.join(not_done)}",
                phase_state=PhaseState.UPSTREAM_FAILED,
            )
            return None
        pipeline = get_pipeline()
        artifacts: list[Artifact] = []
        for pr in phases:
            produces = pipeline.phases[pr.name].produces if pr.name in pipeline else ()
            for name in produces:
                mine = pr.artifacts.filter(name=name).first()
                record = mine or Artifact.objects.for_fingerprint(name, pr.fingerprint).first()
                if record is None:
                    _end_run(
                        run_id,
                        RunState.FAILED,
                        f"artifact {name!r} of phase {pr.name} has no record",
                        phase_state=PhaseState.UPSTREAM_FAILED,
                    )
                    return None
                artifacts.append(record)
        now = timezone.now()
        generation = Generation.objects.create(
            run=run, fingerprints={p.name: p.fingerprint for p in phases}
        )
        generation.artifacts.set(artifacts)
        Generation.objects.filter(is_active=True).update(is_active=False)
        generation.is_active = True
        generation.activated_at = now
        generation.save(update_fields=["is_active", "activated_at"])
        run.state = RunState.SUCCEEDED
        run.finished_at = now
        run.save(update_fields=["state", "finished_at"])
    logger.info("run %s succeeded: generation %s is active", run_id, generation.pk)
    if conf.get("GC_AFTER_ACTIVATION"):
        from . import retention

        try:
            retention.collect()
        except Exception:
            # The new generation is active; a failed clean-up must not undo that.
            logger.exception("deleting old artifacts after run %s failed", run_id)
    return generation


def cancel(*, run_id: int | None = None) -> PipelineRun | None:
    """Cancel a run in flight (the latest one when no id is given); returns it, or None."""
    qs = PipelineRun.objects.in_flight()
    run = qs.filter(pk=run_id).first() if run_id is not None else qs.first()
    if run is None:
        return None
    task_ids = list(
        run.phases.filter(state=PhaseState.RUNNING)
        .exclude(task_id="")
        .values_list("task_id", flat=True)
    )
    # The running phase sees the cancelled state at its next heartbeat or progress call.
    _end_run(run.pk, RunState.CANCELLED, "cancelled", phase_state=PhaseState.CANCELLED)
    if task_ids:
        # Revoked ids are refused by every worker, so a redelivered copy never starts.
        # A running copy is not killed: it stops itself at its next heartbeat.
        try:
            from celery import current_app

            current_app.control.revoke(task_ids)
        except Exception:
            logger.warning("could not revoke the tasks of run %s", run.pk, exc_info=True)
    run.refresh_from_db()
    return run


# -- reporting ----------------------------------------------------------------------------


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def phase_dict(pr: PhaseRun) -> dict[str, Any]:
    return {
        "name": pr.name,
        "state": pr.state,
        "progress": round(pr.progress, 4),
        "message": pr.message,
        "attempt": pr.attempt,
        "max_attempts": pr.max_attempts,
        "started_at": _iso(pr.started_at),
        "finished_at": _iso(pr.finished_at),
        "duration": pr.duration,
        "error": (pr.error + ("\n\n" + pr.traceback if pr.traceback else "")) or None,
    }


def run_dict(run: PipelineRun) -> dict[str, Any]:
    return {
        "id": run.pk,
        "state": run.state,
        "trigger": run.trigger,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "error": run.error or None,
        "phases": [phase_dict(p) for p in run.phases.order_by("position")],
        "estimate_remaining": _estimate(run),
    }


def _estimate(run: PipelineRun) -> float | None:
    """Seconds left, from the phases' earlier durations (history.py); None when unknown."""
    from .history import estimate_remaining

    seconds = estimate_remaining(run)
    return None if seconds is None else round(seconds, 1)


def status(*, run_id: int | None = None) -> dict[str, Any]:
    """The state of the init as one JSON-ready dict (see README: init_status --json)."""
    active = active_generation()
    latest = PipelineRun.objects.latest_first().first()
    run = PipelineRun.objects.filter(pk=run_id).first() if run_id is not None else latest
    if run_id is not None and run is None:
        raise PipelineConfigError(f"there is no run {run_id}")
    if latest is not None and latest.state == RunState.FAILED:
        state = "failed"
    elif active is not None:
        state = "ready"
    else:
        state = "not_ready"
    return {
        "state": state,
        "active_generation": None
        if active is None
        else {
            "id": active.pk,
            "run": active.run_id,
            "activated_at": _iso(active.activated_at),
            "artifacts": [
                {"name": a.name, "sha256": a.sha256, "size": a.size, "format": a.format}
                for a in active.artifacts.order_by("name")
            ],
        },
        "run": None if run is None else run_dict(run),
    }


def wait(
    run_id: int,
    *,
    on_update: Callable[[PipelineRun, list[PhaseRun]], None] | None = None,
    poll: float = 0.5,
    timeout: float | None = None,
) -> PipelineRun:
    """Poll the run until it ends; ``on_update`` sees every poll."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        close_old_connections()
        run = PipelineRun.objects.get(pk=run_id)
        phases = list(run.phases.order_by("position"))
        if on_update is not None:
            on_update(run, phases)
        if run.state not in IN_FLIGHT:
            return run
        if deadline is not None and time.monotonic() > deadline:
            return run
        time.sleep(poll)
