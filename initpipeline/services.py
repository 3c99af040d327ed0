"""Start, cancel and wait for runs: what the commands and the admin's buttons call."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, close_old_connections, transaction
from django.utils import timezone

from . import checkpoints, checks, dispatch, shards, storage, tracing
from .conf import settings
from .exceptions import EnqueueError, PipelineConfigError
from .models import (
    IN_FLIGHT,
    Artifact,
    Generation,
    PhaseRun,
    PhaseState,
    PipelineRun,
    RunState,
)
from .outcomes import end_run, finish_run
from .planning import FORCED, Plan, make_plan
from .recovery import recover_stale
from .registry import Pipeline, get_pipeline
from .reporting import RunReport, run_report

logger = logging.getLogger("initpipeline")

UP_TO_DATE = "up_to_date"
ENQUEUED = "enqueued"
ATTACHED = "attached"


@dataclass(frozen=True)
class StartResult:
    """What ``start()`` did: ``outcome`` is up_to_date, enqueued or attached; ``superseded``,
    the run in flight it cancelled because that run was planned with other code."""

    outcome: str
    run: PipelineRun | None
    generation: Generation | None = None
    superseded: PipelineRun | None = None


def _forced(
    pipeline: Pipeline, *, force: bool, from_phase: str | None, only: Sequence[str]
) -> set[str]:
    if force:
        return set(pipeline.phases)
    forced: set[str] = set()
    if from_phase is not None:
        # `--from ""` (an empty shell variable) is a mistake, not "no --from".
        pipeline[from_phase]
        forced |= {from_phase, *pipeline.descendants(from_phase)}
    for name in only:
        pipeline[name]
        forced.add(name)
    return forced


def _resolve(
    *, force: bool, from_phase: str | None, only: Sequence[str]
) -> tuple[Pipeline, set[str]]:
    """The checked pipeline and the phases forced to run; raises PipelineConfigError."""
    pipeline = get_pipeline()
    checks.validate_pipeline(pipeline)
    return pipeline, _forced(pipeline, force=force, from_phase=from_phase, only=only)


def plan(*, force: bool = False, from_phase: str | None = None, only: Sequence[str] = ()) -> Plan:
    """What start() with these options would run, and why (``start_init --dry-run``).

    Reads only: no run is created, nothing is sent, no broker is needed. Raises
    PipelineConfigError like start().
    """
    pipeline, forced = _resolve(force=force, from_phase=from_phase, only=only)
    return make_plan(pipeline, forced=forced)


def start(
    *,
    force: bool = False,
    from_phase: str | None = None,
    only: Sequence[str] = (),
    trigger: str = "",
) -> StartResult:
    """Start the pipeline unless it is up to date or already running (single flight).

    Runs what plan() says with the same options: the phases it plans to run are sent,
    the others are recorded as cached, each with the plan's reason. Raises
    PipelineConfigError for an invalid pipeline or an unknown phase name, and
    EnqueueError when the broker refuses the tasks (the run is then cancelled, "not
    started": it is no failed init, and init_status goes on saying what serves).
    """
    # The run's trace (if the project traces) starts here, but only a new run makes one.
    trace = tracing.RunTrace()
    pipeline, forced = _resolve(force=force, from_phase=from_phase, only=only)
    fingerprints = pipeline.fingerprints()

    # A run "in flight" whose worker is gone must not capture this start: its stale phase
    # is sent again (or failed, out of attempts) before we decide to attach to it.
    recover_stale()
    superseded = None
    # Each pass either attaches to a run of this code, finds the init up to date, creates
    # the run, or lost a race to another start (which it looks at again on the next pass).
    for _ in range(START_PASSES):
        existing = PipelineRun.objects.in_flight().first()
        if existing is not None:
            if _planned(existing) == fingerprints:
                return StartResult(ATTACHED, existing)
            # Planned with other code or settings (the previous deploy's, or a start with
            # other code racing this one): its output would be stale the moment it is
            # active, and workers with this code hand its phases back. It makes way; what
            # it finished stays cached, its checkpoints are resumed.
            superseded = (
                cancel(
                    run_id=existing.pk,
                    reason="superseded: the code or settings changed since it started",
                )
                or superseded
            )
            continue

        # Planning verifies artifacts before the write transaction: hashing large files
        # must not hold SQLite's write lock.
        the_plan = make_plan(pipeline, forced=forced)
        if the_plan.up_to_date:
            return StartResult(UP_TO_DATE, None, the_plan.active)
        options: dict[str, Any] = {"force": force, "from": from_phase, "only": list(only)}
        try:
            with transaction.atomic():
                if PipelineRun.objects.in_flight().exists():
                    raise _Raced
                trace.begin(trigger=trigger, options=options)
                run = PipelineRun.objects.create(trigger=trigger[:200], options=options)
                rows = _rows(run, pipeline, the_plan)
                # A phase forced to run again starts from scratch; the others resume from
                # the checkpoint an earlier run of the same code left, if any.
                forced_now = {p.name for p in the_plan.phases if p.reason == FORCED}
                checkpoints.adopt(
                    [
                        r
                        for r in rows
                        if r.state == PhaseState.PENDING
                        and (r.shard_of or r.name) not in forced_now
                    ]
                )
                PhaseRun.objects.bulk_create(rows)
                _adopt(the_plan)
                to_run = [r.name for r in rows if r.state == PhaseState.PENDING]
                trace.created(run, to_run)
                transaction.on_commit(functools.partial(trace.within, enqueue, run.pk, to_run))
        except (IntegrityError, _Raced) as exc:
            # Another start won the race between our look and our insert (the partial
            # unique index initpipeline_run_single_flight let exactly one through): look
            # at its run, which may have been planned with other code.
            trace.end(exc)
            trace = tracing.RunTrace()
            continue
        except BaseException as exc:
            trace.end(exc)
            raise
        break
    else:
        raise PipelineConfigError(
            f"could not start: {START_PASSES} other starts with other code raced this one"
        )
    run.refresh_from_db()
    if run.state == RunState.CANCELLED and run.error.startswith(NOT_SENT):
        error = EnqueueError(run.error.removeprefix(NOT_SENT))
        trace.end(error)
        raise error
    trace.end()
    # DEBUG: the command, the admin and the Gunicorn hook each say it in their own words.
    logger.debug("run %s enqueued: %s", run.pk, ", ".join(to_run) or "nothing to run")
    return StartResult(ENQUEUED, run, superseded=superseded)


def _adopt(the_plan: Plan) -> None:
    """Record artifacts built before code counted in fingerprints under their new ones.

    The record points at the same file and keeps the run that built it; the new
    fingerprint is what lets this run, and the next, find it (README: Upgrading).
    """
    for p in the_plan.phases:
        for old in p.adopt:
            Artifact.objects.create(
                name=old.name,
                fingerprint=p.fingerprint,
                storage_key=old.storage_key,
                digest=old.digest,
                size=old.size,
                format=old.format,
                metadata={**old.metadata, "adopted_from": old.pk},
                run_id=old.run_id,
                phase_run_id=old.phase_run_id,
            )
        if p.adopt:
            logger.info(
                "phase %s: adopted %s, built before code counted in fingerprints",
                p.name,
                ", ".join(a.name for a in p.adopt),
            )


def _rows(run: PipelineRun, pipeline: Pipeline, the_plan: Plan) -> list[PhaseRun]:
    """The records of a new run: a row per phase, and one per shard of a sharded phase that
    runs (its shards before it; it waits for them all and merges their parts)."""
    rows: list[PhaseRun] = []
    for p in the_plan.phases:
        phase = pipeline.phases[p.name]
        common = {
            "run": run,
            "version": phase.version,
            "max_attempts": phase.retries + 1,
            "max_losses": settings.LOST_LIMIT,
            "timeout": phase.timeout or settings.DEFAULT_TIMEOUT,
        }
        depends_on = pipeline.dependencies(p.name)
        count = phase.shard_count() if phase.sharded else None
        shard_names = []
        shards_done = 0
        for index in range(0 if p.cached else count or 0):
            fingerprint = shards.fingerprint(p.fingerprint, index, count or 0)
            parts = [shards.part_name(a, index, count or 0) for a in phase.produces]
            cached = p.reason != FORCED and _parts_cached(parts, fingerprint)
            shards_done += cached
            shard_names.append(shards.row_name(p.name, index))
            rows.append(
                PhaseRun(
                    name=shard_names[-1],
                    position=len(rows),
                    fingerprint=fingerprint,
                    recipe=p.recipe,
                    reason="unchanged" if cached else p.reason[:200],
                    depends_on=depends_on,
                    produces=parts,
                    state=PhaseState.CACHED if cached else PhaseState.PENDING,
                    shard_of=p.name,
                    shard_index=index,
                    shard_count=count,
                    **common,
                )
            )
        rows.append(
            PhaseRun(
                name=p.name,
                position=len(rows),
                fingerprint=p.fingerprint,
                recipe=p.recipe,
                reason=p.reason[:200],
                depends_on=shard_names or depends_on,
                produces=list(phase.produces),
                state=PhaseState.CACHED if p.cached else PhaseState.PENDING,
                shard_count=count,
                shards_done=shards_done,
                **common,
            )
        )
    return rows


def _parts_cached(parts: Sequence[str], fingerprint: str) -> bool:
    """A shard is cached when every part it saved under its fingerprint can serve."""
    for name in parts:
        record = Artifact.objects.for_fingerprint(name, fingerprint).first()
        if record is None or not storage.is_valid(record):
            return False
    return True


#: How often start() looks again after losing a race to another start.
START_PASSES = 20


class _Raced(Exception):
    """Another start created a run between start()'s look and its insert."""


def _planned(run: PipelineRun) -> dict[str, str]:
    """The fingerprint the run planned for each phase (its shards aside)."""
    return dict(run.phases.filter(shard_of="").values_list("name", "fingerprint"))


#: How the error of a run whose tasks never reached the broker begins.
NOT_SENT = "not started: "


def enqueue(run_id: int, names: Sequence[str]) -> None:
    """Send a new run's ready chains; a broker that refuses them cancels the run (it never
    started: not a failed init)."""
    if not names:
        # Every phase is cached (say, a rollback to an earlier configuration): no worker
        # is needed to switch generations.
        finish_run(run_id=run_id)
        return
    phases = list(PhaseRun.objects.filter(run_id=run_id).order_by("position"))
    try:
        # Phases with no dependency between them start side by side, one chain each.
        dispatch.send_chains(run_id, dispatch.plan_chains(phases))
    except Exception as exc:
        reason = f"could not send the run's tasks to the broker: {type(exc).__name__}: {exc}"
        # start() raises EnqueueError with the reason, and its callers report it in one
        # line (the command on stderr, the admin as a message); the traceback is for DEBUG.
        logger.debug("run %s: %s", run_id, reason, exc_info=True)
        # Not a failed init: nothing ran, the active generation (if any) serves as before.
        # Cancelled, so that init_status keeps saying what serves (README: Commands).
        end_run(run_id, RunState.CANCELLED, NOT_SENT + reason, phase_state=PhaseState.CANCELLED)


def cancel(*, run_id: int | None = None, reason: str = "cancelled") -> PipelineRun | None:
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
            state=RunState.CANCELLED, finished_at=now, error=reason
        )
        if not cancelled:
            return None
        task_ids = list(
            run.phases.filter(state=PhaseState.RUNNING)
            .exclude(task_id="")
            .values_list("task_id", flat=True)
        )
        run.phases.unfinished().update(state=PhaseState.CANCELLED, finished_at=now, message=reason)
    if task_ids:
        # Revoked ids are refused by every worker, so a redelivered copy never starts.
        # A running copy is not killed: it stops itself at its next heartbeat.
        try:
            with dispatch.connection() as conn:
                dispatch.celery_app().control.revoke(task_ids, connection=conn)
        except Exception as exc:
            logger.warning("could not revoke the tasks of run %s: %s", run.pk, exc)
    run.refresh_from_db()
    return run


def wait(
    run_id: int,
    *,
    on_update: Callable[[RunReport], None] | None = None,
    poll: float = 0.5,
    timeout: float | None = None,
) -> RunReport:
    """Poll the run until it ends (or ``timeout``); ``on_update`` sees every poll's report."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        close_old_connections()
        report = run_report(PipelineRun.objects.get(pk=run_id), estimate=False)
        if on_update is not None:
            on_update(report)
        if not report.in_flight:
            return report
        if deadline is not None and time.monotonic() > deadline:
            return report
        time.sleep(poll)
