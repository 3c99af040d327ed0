"""Thin Celery tasks: they take ids and call the services."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore

from . import services
from .models import PhaseState

logger = logging.getLogger("initpipeline")

#: How phase tasks are acknowledged; checks.py reads it (initpipeline.W003).
#: acks_late + reject_on_worker_lost: a worker that dies mid-phase does not lose the
#: message on brokers that redeliver (FIELD_NOTES, Celery). Our own heartbeat and
#: recovery.py cover the filesystem broker, which does not, and Redis, which redelivers
#: only after visibility_timeout.
PHASE_TASK_OPTIONS: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True}


@shared_task(
    bind=True,
    name="initpipeline.run_phase",
    ignore_result=True,
    max_retries=None,
    **PHASE_TASK_OPTIONS,
)
def run_phase(self: Any, run_id: int, phase_name: str, advance: bool = False) -> str:
    """Run one phase of a run; ``advance``: it ends its chain (services.send_chain)."""
    try:
        state = services.execute_phase(
            run_id=run_id,
            phase_name=phase_name,
            task_id=self.request.id or "",
            worker=self.request.hostname or "",
            advance=advance,
        )
    except services.RetryPhase as retry:
        # self.retry keeps the rest of the chain in the new message.
        raise self.retry(countdown=retry.countdown) from None
    except services.PhaseSkipped as skipped:
        logger.info("skipping %s of run %s: %s", phase_name, run_id, skipped)
        # Ignore: this copy neither succeeds nor fails, so it sends no next step.
        raise Ignore() from None
    except services.PhaseFailed:
        # Recorded by the service; raising stops the chain (no later phase runs).
        raise
    if state == PhaseState.CANCELLED:
        # The run is cancelled: send no next step.
        raise Ignore()
    return state


@shared_task(name="initpipeline.finish_run", acks_late=True, ignore_result=True)
def finish_run(run_id: int) -> int | None:
    """Activate the run's generation."""
    generation = services.finish_run(run_id=run_id)
    return generation.pk if generation else None
