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
from datetime import datetime
from typing import Any, NoReturn

from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models import Q, QuerySet
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

    # A run "in flight" whose worker is gone must not capture this start: its stale phase
    # is sent again (or failed, out of attempts) before we decide to attach to it.
    from .recovery import recover_stale

    recover_stale()
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
                    depends_on=pipeline.dependencies(name),
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


#: Seconds between a phase's soft time limit (its timeout) and the hard limit that kills it.
HARD_LIMIT_GRACE = 30


def _enqueue(run_id: int, names: Sequence[str]) -> None:
    if not names:
        # Every phase is cached (say, a rollback to an earlier configuration): no worker
        # is needed to switch generations.
        finish_run(run_id=run_id)
        return
    phases = list(PhaseRun.objects.filter(run_id=run_id).order_by("position"))
    try:
        # Phases with no dependency between them start side by side, one chain each.
        for chain_names in plan_chains(phases):
            send_chain(run_id, chain_names)
    except Exception as exc:
        logger.exception("could not enqueue run %s", run_id)
        reason = f"could not send the run's tasks to the broker: {type(exc).__name__}: {exc}"
        _end_run(run_id, RunState.FAILED, reason, phase_state=PhaseState.CANCELLED)


def plan_chains(
    phases: Sequence[PhaseRun], *, start: Sequence[str] | None = None
) -> list[list[str]]:
    """The chains to send now: one per pending phase whose dependencies are all done.

    Each chain carries on through the phases that only its last phase unblocks (a linear
    pipeline is one chain, as before). ``start`` limits the chains to those that begin at
    these phases. The phases of a run come from its records (``depends_on``), so workers
    running other code than the deploy step still follow the run's plan.
    """
    todo = {p.name: p for p in phases if p.state not in PHASE_DONE}
    deps = {name: [d for d in p.depends_on if d in todo] for name, p in todo.items()}
    dependants: dict[str, list[str]] = {name: [] for name in todo}
    for name in sorted(todo, key=lambda n: todo[n].position):
        for dep in deps[name]:
            dependants[dep].append(name)
    chains = []
    for name in sorted(todo, key=lambda n: todo[n].position):
        if todo[name].state != PhaseState.PENDING or deps[name]:
            continue
        if start is not None and name not in start:
            continue
        chain = [name]
        while len(dependants[chain[-1]]) == 1:
            following = dependants[chain[-1]][0]
            if deps[following] != [chain[-1]]:
                break
            chain.append(following)
        chains.append(chain)
    return chains


def send_chain(run_id: int, names: Sequence[str]) -> None:
    """Send phases ``names`` of a run, in this order, as one Celery chain.

    ``names`` is one of plan_chains(): start() sends every chain ready at the start, the
    last phase of a chain sends the chains it unblocks (_succeeded), and recovery sends
    again from a lost phase (Celery cannot resume a chain, celery#3325). A chain that holds
    every phase left of its run ends with the run's finish step; any other chain's last
    phase advances the run when it succeeds. Raises what the broker raised.
    """
    from celery import chain

    from . import tasks

    queue = conf.get("QUEUE")
    # The limits come from the run's records, so what a PhaseRun shows is what is enforced.
    rows = PhaseRun.objects.filter(run_id=run_id).values_list("name", "timeout", "state")
    timeouts = {name: timeout for name, timeout, _ in rows}
    left = {name for name, _, state in rows if state not in PHASE_DONE}
    finishes = left <= set(names)
    steps = []
    for i, name in enumerate(names):
        timeout = int(timeouts.get(name) or conf.get("DEFAULT_TIMEOUT"))
        # Immutable signatures: a step never receives the previous step's return value.
        limits: dict[str, Any] = {
            "soft_time_limit": timeout,
            "time_limit": timeout + HARD_LIMIT_GRACE,
        }
        kwargs = {"advance": True} if i == len(names) - 1 and not finishes else {}
        sig = tasks.run_phase.si(run_id, name, **kwargs).set(**limits)
        if queue:
            sig = sig.set(queue=queue)
        steps.append(sig)
    if finishes:
        steps.append(_finish_step(run_id))
    chain(*steps).apply_async()


def _finish_step(run_id: int) -> Any:
    from . import tasks

    queue = conf.get("QUEUE")
    finish = tasks.finish_run.si(run_id)
    return finish.set(queue=queue) if queue else finish


def send_finish(run_id: int) -> None:
    """Send the run's finish step on its own (its last phases ran in parallel chains)."""
    _finish_step(run_id).apply_async()


def _send_next(run_id: int, after: str, chains: list[list[str]], finish: bool) -> None:
    """Send what the phase ``after`` unblocked; a failed send is left to recovery."""
    try:
        for names in chains:
            send_chain(run_id, names)
        if finish:
            send_finish(run_id)
    except Exception:
        # The phases stay pending (or the run stays in flight with every phase done):
        # recovery.py sends them again once the broker is back.
        logger.exception("run %s: could not send what %s unblocked", run_id, after)
        return
    if chains:
        logger.info(
            "run %s: %s unblocked %s",
            run_id,
            after,
            "; ".join(" -> ".join(names) for names in chains),
        )


# -- executing a phase (inside a Celery worker) -------------------------------------------


class _Heartbeat(threading.Thread):
    """Writes the phase's heartbeat every HEARTBEAT_INTERVAL while this copy owns the row.

    A copy owns the row while it is ``running`` with the copy's attempt number. Once it does
    not (the run was cancelled, or a stale phase was taken over by recovery or by another
    delivery), the thread sets ``ctx.cancelled``: the phase stops at its next progress()
    or heartbeat() call, and this copy records nothing.
    """

    def __init__(self, pr: PhaseRun, ctx: PhaseContext) -> None:
        super().__init__(name=f"initpipeline-heartbeat-{pr.pk}", daemon=True)
        self.phase_run_id = pr.pk
        self.attempt = pr.attempt
        self.ctx = ctx
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = float(conf.get("HEARTBEAT_INTERVAL"))
        try:
            while not self.stopped.wait(interval):
                try:
                    owned = PhaseRun.objects.filter(
                        pk=self.phase_run_id, attempt=self.attempt, state=PhaseState.RUNNING
                    ).update(heartbeat_at=timezone.now())
                except Exception:
                    logger.exception("heartbeat of phase run %s failed", self.phase_run_id)
                    continue
                if not owned:
                    self.ctx.cancelled.set()
                    return
        finally:
            # Django connections are per thread: close this thread's own.
            connection.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


def heartbeat_age(pr: PhaseRun, now: datetime) -> float:
    """Seconds since the phase's last sign of life (infinite when it never showed one)."""
    seen = pr.heartbeat_at or pr.started_at
    return float("inf") if seen is None else (now - seen).total_seconds()


def worker_lost(pr: PhaseRun, age: float) -> str:
    """Why a running phase with an old heartbeat counts as lost, for its records."""
    since = "ever" if age == float("inf") else f"{age:.0f} s"
    return (
        f"worker {pr.worker or '?'} lost during attempt {pr.attempt} of {pr.max_attempts}: "
        f"no heartbeat for {since}"
    )


def _claim(run_id: int, phase_name: str, task_id: str, worker: str) -> PhaseRun:
    """Make this delivery the owner of the phase's row, or raise PhaseSkipped/PhaseFailed.

    The row is the lock: a copy runs the phase only when it is pending, or running with a
    heartbeat older than STALE_AFTER (its worker is gone). Each claim takes the next attempt
    number; (row, attempt) identifies the owner from then on.
    """
    stale_after = float(conf.get("STALE_AFTER"))
    lost = ""
    out_of_attempts = False
    with transaction.atomic():
        pr = (
            PhaseRun.objects.select_for_update()
            .select_related("run")
            .get(run_id=run_id, name=phase_name)
        )
        run = pr.run
        now = timezone.now()
        if run.state not in IN_FLIGHT:
            raise PhaseSkipped(f"run {run_id} is {run.state}")
        if pr.state in PHASE_DONE:
            raise PhaseSkipped(f"phase {phase_name} is already {pr.state} (duplicate delivery)")
        if pr.state != PhaseState.PENDING and pr.state != PhaseState.RUNNING:
            raise PhaseSkipped(f"phase {phase_name} is {pr.state}")
        if pr.state == PhaseState.RUNNING:
            age = heartbeat_age(pr, now)
            if age < stale_after:
                # At-least-once delivery: Redis delivers a task again while it still runs
                # once visibility_timeout has passed (celery#5935), under the same task id,
                # so only the heartbeat tells a live copy from a lost one.
                raise PhaseSkipped(
                    f"phase {phase_name} attempt {pr.attempt} is running in task "
                    f"{pr.task_id} on {pr.worker} (heartbeat {age:.1f} s ago)"
                )
            lost = worker_lost(pr, age)
            if pr.attempt >= pr.max_attempts:
                out_of_attempts = _fail(pr, f"{lost}; no attempts left", "")
        if not out_of_attempts:
            pr.state = PhaseState.RUNNING
            pr.attempt += 1
            pr.task_id = task_id
            pr.worker = worker[:255]
            pr.started_at = pr.started_at or now
            pr.heartbeat_at = now
            pr.finished_at = None
            if lost:
                pr.message = f"attempt {pr.attempt} took over: {lost}"[:500]
            pr.save()
            if run.state == RunState.PENDING:
                run.state = RunState.RUNNING
                run.started_at = now
                run.save(update_fields=["state", "started_at"])
    if out_of_attempts:
        logger.error("phase %s of run %s failed: %s; no attempts left", phase_name, run_id, lost)
        raise PhaseFailed(f"{lost}; no attempts left")
    if lost:
        logger.warning(
            "phase %s of run %s: attempt %d takes over (%s)", pr.name, run_id, pr.attempt, lost
        )
    return pr


def execute_phase(
    *, run_id: int, phase_name: str, task_id: str = "", worker: str = "", advance: bool = False
) -> str:
    """Run one phase of a run and record the outcome; returns the phase's final state.

    ``advance``: this phase ends its chain, so once it succeeds it sends the phases it
    unblocks (or the run's finish step, when no phase is left).

    Returns succeeded, or cancelled when the run was cancelled while the phase ran. Raises
    RetryPhase when it failed with attempts left, PhaseFailed when it failed for good (the
    run is then failed), PhaseSkipped when this delivery must not run it, or lost the phase
    to another copy while it ran (a stale phase taken over): such a copy records nothing.
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
    beat = _Heartbeat(pr, ctx)
    beat.start()
    started = time.monotonic()
    try:
        phase.func(ctx)
        published = ctx.published()
    except Exception as exc:
        beat.stop()
        if isinstance(exc, PhaseCancelled) and ctx.cancelled.is_set():
            return _stopped(pr, time.monotonic() - started)
        _failed_attempt(pr, exc, traceback.format_exc())
    beat.stop()
    return _succeeded(pr, published, time.monotonic() - started, advance=advance)


def _owned(pr: PhaseRun) -> QuerySet[PhaseRun]:
    """The phase's row, if this attempt still owns it and it is running."""
    return PhaseRun.objects.filter(pk=pr.pk, attempt=pr.attempt, state=PhaseState.RUNNING)


def _taken_over(pr: PhaseRun) -> PhaseSkipped:
    return PhaseSkipped(
        f"phase {pr.name} of run {pr.run_id}: attempt {pr.attempt} no longer owns the phase "
        "(cancelled, or taken over after its heartbeat went stale); recording nothing"
    )


def _stopped(pr: PhaseRun, seconds: float) -> str:
    """The phase stopped itself because it no longer owns its row."""
    stopped = PhaseRun.objects.filter(
        pk=pr.pk, attempt=pr.attempt, state=PhaseState.CANCELLED
    ).update(finished_at=timezone.now(), message=f"cancelled; stopped after {seconds:.1f} s")
    if not stopped:
        raise _taken_over(pr)
    logger.info("phase %s of run %s stopped: run cancelled", pr.name, pr.run_id)
    return PhaseState.CANCELLED


def _failed_attempt(pr: PhaseRun, exc: BaseException, tb: str) -> NoReturn:
    error = f"{type(exc).__name__}: {exc}"
    if type(exc).__name__ == "SoftTimeLimitExceeded":
        # Celery's soft limit, set to the phase's timeout when the chain was sent.
        error = f"timed out after {pr.timeout} s (Celery soft time limit)"
    if pr.attempt < pr.max_attempts:
        countdown = backoff(pr.attempt)
        # heartbeat_at = now: the worker is alive and the retry is on its way; recovery
        # allows the backoff to pass before it counts the phase as lost (recovery.py).
        # Only while the run is in flight: a phase that fails after one beside it failed
        # the run has nothing to retry for, and fails below.
        retrying = (
            _owned(pr)
            .filter(run__state__in=IN_FLIGHT)
            .update(
                state=PhaseState.PENDING,
                error=error,
                traceback=tb,
                heartbeat_at=timezone.now(),
                message=f"attempt {pr.attempt} failed; retrying in {countdown:.0f} s",
            )
        )
        if retrying:
            logger.warning(
                "phase %s attempt %d/%d failed (%s); retrying in %.1f s",
                pr.name,
                pr.attempt,
                pr.max_attempts,
                error,
                countdown,
            )
            raise RetryPhase(countdown) from exc
    # _fail changes nothing when this attempt no longer owns the phase.
    if not _fail(pr, error, tb):
        raise _taken_over(pr) from exc
    logger.error("phase %s of run %s failed: %s\n%s", pr.name, pr.run_id, error, tb)
    raise PhaseFailed(error) from exc


def _succeeded(
    pr: PhaseRun,
    published: dict[str, tuple[storage.Published, str, dict[str, Any]]],
    seconds: float,
    *,
    advance: bool = False,
) -> str:
    with transaction.atomic():
        if advance:
            # The run's row serialises the ends of parallel chains: of two phases that a
            # third waits for, exactly one sees the other done and sends the third.
            run_state = (
                PipelineRun.objects.select_for_update()
                .filter(pk=pr.run_id)
                .values_list("state", flat=True)
                .get()
            )
        row = PhaseRun.objects.select_for_update().filter(pk=pr.pk).values("attempt", "state")
        current = row.get()
        mine = current["attempt"] == pr.attempt
        state = current["state"]
        if mine and state in (PhaseState.RUNNING, PhaseState.CANCELLED):
            # The files are complete and verified by checksum: a phase that finished as its
            # run was cancelled (or failed elsewhere) still records them, so the next run
            # finds them cached.
            for name, (pub, fmt, metadata) in published.items():
                Artifact.objects.create(
                    name=name,
                    fingerprint=pr.fingerprint,
                    storage_key=pub.key,
                    sha256=pub.sha256,
                    size=pub.size,
                    format=fmt,
                    metadata=metadata,
                    run_id=pr.run_id,
                    phase_run=pr,
                )
        if mine and state == PhaseState.RUNNING:
            PhaseRun.objects.filter(pk=pr.pk).update(
                state=PhaseState.SUCCEEDED,
                finished_at=timezone.now(),
                progress_done=1,
                progress_total=1,
                error="",
                traceback="",
            )
            if advance and run_state in IN_FLIGHT:
                _advance(pr)
    if not mine or state not in (PhaseState.RUNNING, PhaseState.CANCELLED):
        raise _taken_over(pr)
    if state == PhaseState.CANCELLED:
        PhaseRun.objects.filter(pk=pr.pk).update(
            finished_at=timezone.now(),
            message="cancelled as it finished; its artifacts are kept for the next run",
        )
        logger.info("phase %s of run %s finished after its run was cancelled", pr.name, pr.run_id)
        return PhaseState.CANCELLED
    logger.info("phase %s of run %s succeeded in %.2f s", pr.name, pr.run_id, seconds)
    return PhaseState.SUCCEEDED


def _advance(pr: PhaseRun) -> None:
    """Inside _succeeded's transaction: send, once it commits, what ``pr`` unblocked."""
    phases = list(PhaseRun.objects.filter(run_id=pr.run_id).order_by("position"))
    waits_for = {p.name: p.depends_on for p in phases}
    chains = [names for names in plan_chains(phases) if pr.name in waits_for[names[0]]]
    finish = all(p.state in PHASE_DONE for p in phases)
    if chains or finish:
        run_id, name = pr.run_id, pr.name
        transaction.on_commit(lambda: _send_next(run_id, name, chains, finish))


def descendants(phases: Sequence[PhaseRun], name: str) -> set[str]:
    """The phases of a run that wait for ``name``, directly or not, from its records."""
    found: set[str] = set()
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for p in phases:
            if current in p.depends_on and p.name not in found:
                found.add(p.name)
                frontier.append(p.name)
    return found


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter: a delay in [base*2^(n-1)/2, base*2^(n-1)]."""
    return backoff_ceiling(attempt) / 2 + random.uniform(0, backoff_ceiling(attempt) / 2)


def backoff_ceiling(attempt: int) -> float:
    """The longest delay backoff(attempt) may choose."""
    base = float(conf.get("RETRY_BACKOFF"))
    return min(float(conf.get("RETRY_BACKOFF_MAX")), base * float(2 ** max(attempt - 1, 0)))


def _fail(pr: PhaseRun, error: str, tb: str, *, stale_before: datetime | None = None) -> bool:
    """Fail this attempt of the phase, the phases that depend on it, and the run.

    Returns False, changing nothing, when the attempt no longer holds the row (another copy
    claimed it, or it ended) or, with ``stale_before``, when it showed a sign of life since.
    """
    now = timezone.now()
    with transaction.atomic():
        mine = PhaseRun.objects.filter(
            pk=pr.pk, attempt=pr.attempt, state__in=[PhaseState.PENDING, PhaseState.RUNNING]
        )
        if stale_before is not None:
            mine = mine.filter(Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=stale_before))
        if not mine.update(state=PhaseState.FAILED, error=error, traceback=tb, finished_at=now):
            return False
        phases = list(PhaseRun.objects.filter(run_id=pr.run_id).only("name", "depends_on"))
        waiting = PhaseRun.objects.filter(run_id=pr.run_id, state=PhaseState.PENDING)
        below = descendants(phases, pr.name)
        waiting.filter(name__in=below).update(
            state=PhaseState.UPSTREAM_FAILED, message=f"not run: {pr.name} failed"
        )
        # Phases that do not depend on it: a running one finishes and keeps its artifacts
        # for the next run; a pending one never starts in a failed run.
        waiting.exclude(name__in=below).update(
            state=PhaseState.CANCELLED,
            finished_at=now,
            message=f"not run: the run failed at {pr.name}",
        )
        PipelineRun.objects.filter(pk=pr.run_id, state__in=IN_FLIGHT).update(
            state=RunState.FAILED, finished_at=now, error=f"phase {pr.name} failed: {error}"
        )
    return True


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
    """Cancel a run in flight (the latest one when no id is given); returns it, or None.

    None means there was nothing to cancel: no run in flight, or the run ended (say, its
    last phase finished and activated its generation) before the cancel landed. The running
    phase stops at its next heartbeat or progress call; one that finishes anyway keeps its
    artifacts for the next run, but a cancelled run never activates a generation.
    """
    qs = PipelineRun.objects.in_flight()
    run = qs.filter(pk=run_id).first() if run_id is not None else qs.first()
    if run is None:
        return None
    now = timezone.now()
    with transaction.atomic():
        # The run row decides the race with finish_run(), which activates a generation
        # only for a run still in flight, under the same row lock: exactly one of them wins.
        cancelled = PipelineRun.objects.filter(pk=run.pk, state__in=IN_FLIGHT).update(
            state=RunState.CANCELLED, finished_at=now, error="cancelled"
        )
        if not cancelled:
            return None
        task_ids = list(
            run.phases.filter(state=PhaseState.RUNNING)
            .exclude(task_id="")
            .values_list("task_id", flat=True)
        )
        run.phases.filter(state__in=[PhaseState.PENDING, PhaseState.RUNNING]).update(
            state=PhaseState.CANCELLED, finished_at=now, message="cancelled"
        )
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
        "timeout": pr.timeout,
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


def status(*, run_id: int | None = None, recover: bool = False) -> dict[str, Any]:
    """The state of the init as one JSON-ready dict (see README: init_status --json).

    ``recover=True`` (init_status does it) first recovers a run left in flight by a lost
    worker (recovery.py), so the operator never waits on a run nothing works on. Web reads
    (/init/status.json, polled every second by each admin page) never write or send.
    """
    if recover:
        from .recovery import recover_stale

        recover_stale()
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
