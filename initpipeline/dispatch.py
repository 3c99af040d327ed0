"""Planning a run's Celery chains from its records, and sending them by task name.

Signatures are built by name, so nothing here imports tasks.py (nor makes a process that
only sends, such as a web process running the admin's "Run again", import the task code).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.utils.module_loading import import_string

from .conf import settings
from .exceptions import PipelineConfigError
from .models import PHASE_DONE, PhaseRun, PhaseState

logger = logging.getLogger("initpipeline")

RUN_PHASE = "initpipeline.run_phase"
FINISH_RUN = "initpipeline.finish_run"

#: How phase tasks are acknowledged; tasks.py applies it and checks.py reads it (W003).
#: acks_late + reject_on_worker_lost: a worker that dies mid-phase does not lose the
#: message on brokers that redeliver (FIELD_NOTES, Celery). Our own heartbeat and
#: recovery.py cover the filesystem broker, which does not, and Redis, which redelivers
#: only after visibility_timeout.
PHASE_TASK_OPTIONS: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True}

#: Seconds between a phase's soft time limit (its timeout) and the hard limit that kills it.
HARD_LIMIT_GRACE = 30


def plan_chains(
    phases: Sequence[PhaseRun], *, start: Sequence[str] | None = None
) -> list[list[str]]:
    """The chains to send now: one per pending phase whose dependencies are all done.

    Each chain carries on through the phases that only its last phase unblocks (a linear
    pipeline is one chain). ``start`` limits the chains to those that begin at these
    phases. The phases of a run come from its records (``depends_on``), so workers running
    other code than the deploy step still follow the run's plan.
    """
    todo = {p.name: p for p in phases if p.state not in PHASE_DONE}
    deps = {name: [d for d in p.depends_on if d in todo] for name, p in todo.items()}
    in_order = sorted(todo, key=lambda n: todo[n].position)
    dependants: dict[str, list[str]] = {name: [] for name in todo}
    for name in in_order:
        for dep in deps[name]:
            dependants[dep].append(name)
    chains = []
    for name in in_order:
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


def unblocked_by(phases: Sequence[PhaseRun], name: str) -> list[list[str]]:
    """The chains that phase ``name``, just done, lets start (see plan_chains)."""
    waits_for = {p.name: p.depends_on for p in phases}
    return [names for names in plan_chains(phases) if name in waits_for[names[0]]]


_REDIS = ("redis", "rediss", "redis+socket", "sentinel")
_AMQP = ("amqp", "amqps", "pyamqp", "librabbitmq")

#: Tries of one send before it fails: the first, then two retries half a second apart.
RETRY_POLICY: dict[str, Any] = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}


def celery_app() -> Any:
    """The project's Celery app: ``INITPIPELINE["CELERY_APP"]``, imported on first use, or
    else Celery's current app.

    A web process imports Celery only here, when it first sends a task (the admin's
    buttons, a command): importing it at start would cost every web process about a
    tenth of a second before its first answer. Workers load the app with ``-A``.
    Raises PipelineConfigError when the setting names nothing importable.
    """
    path = settings.CELERY_APP
    if path:
        try:
            return import_string(path)
        except ImportError as exc:
            raise PipelineConfigError(
                f"INITPIPELINE['CELERY_APP'] = {path!r} cannot be imported: {exc}"
            ) from exc
    from celery import current_app

    return current_app


@contextmanager
def connection() -> Iterator[Any]:
    """A broker connection whose every step is bounded by SEND_TIMEOUT.

    A broker that accepts connections but never answers would otherwise block a send for
    ever: redis-py waits without a socket timeout unless one is given (FIELD_NOTES), and
    a command or the admin's button must fail with a reason instead. Timeouts the project
    sets in CELERY_BROKER_TRANSPORT_OPTIONS win over ours.
    """
    current_app = celery_app()
    timeout = settings.SEND_TIMEOUT
    url = str(current_app.conf.broker_write_url or current_app.conf.broker_url or "")
    scheme = url.split("://", 1)[0].lower()
    options = dict(current_app.conf.broker_transport_options or {})
    if scheme in _REDIS:
        options.setdefault("socket_timeout", timeout)
        options.setdefault("socket_connect_timeout", timeout)
    elif scheme in _AMQP:
        options.setdefault("read_timeout", timeout)
        options.setdefault("write_timeout", timeout)
    with current_app.connection_for_write(
        transport_options=options, connect_timeout=timeout
    ) as conn:
        yield conn


def _signature(
    task: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, **options: Any
) -> Any:
    queue = settings.QUEUE
    if queue:
        options["queue"] = queue
    # Immutable: a step never receives the previous step's return value.
    return celery_app().signature(task, args=args, kwargs=kwargs, immutable=True, **options)


def send_chain(run_id: int, names: Sequence[str]) -> None:
    """Send phases ``names`` of a run, in this order, as one Celery chain (send_chains)."""
    send_chains(run_id, [names])


def send_chains(run_id: int, chains: Sequence[Sequence[str]]) -> None:
    """Send each of ``chains`` (phase names of a run, in order) as one Celery chain.

    A chain is one of plan_chains(): the start of a run sends every chain ready at once,
    the last phase of a chain sends the chains it unblocks (outcomes.py), and recovery
    sends again from a lost phase (Celery cannot resume a chain, celery#3325). A chain that
    holds every phase left of its run ends with the run's finish step; any other chain's
    last phase advances the run when it succeeds. One query and one broker connection for
    them all: a phase that unblocks a sharded phase sends a chain per shard, and a
    connection each cost more than a short shard's work. Raises what the broker raised.
    """
    from celery import chain

    if not chains:
        return
    # The limits come from the run's records, so what a PhaseRun shows is what is enforced.
    rows = PhaseRun.objects.filter(run_id=run_id).values_list("name", "timeout", "state")
    timeouts = {name: timeout for name, timeout, _ in rows}
    left = {name for name, _, state in rows if state not in PHASE_DONE}
    signatures = []
    for names in chains:
        finishes = left <= set(names)
        steps = []
        for i, name in enumerate(names):
            timeout = int(timeouts.get(name) or settings.DEFAULT_TIMEOUT)
            advance = i == len(names) - 1 and not finishes
            steps.append(
                _signature(
                    RUN_PHASE,
                    (run_id, name),
                    {"advance": True} if advance else None,
                    soft_time_limit=timeout,
                    time_limit=timeout + HARD_LIMIT_GRACE,
                )
            )
        if finishes:
            steps.append(_signature(FINISH_RUN, (run_id,)))
        signatures.append(chain(*steps))
    with connection() as conn:
        for signature in signatures:
            signature.apply_async(connection=conn, retry=True, retry_policy=RETRY_POLICY)


def send_finish(run_id: int) -> None:
    """Send the run's finish step on its own (its last phases ran in parallel chains)."""
    with connection() as conn:
        _signature(FINISH_RUN, (run_id,)).apply_async(
            connection=conn, retry=True, retry_policy=RETRY_POLICY
        )


def send_next(run_id: int, after: str, chains: Sequence[Sequence[str]], finish: bool) -> None:
    """Send what the phase ``after`` unblocked; a failed send is left to recovery."""
    try:
        send_chains(run_id, chains)
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
