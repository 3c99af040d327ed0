"""Thin Celery tasks: they take ids and call execution.py and outcomes.py."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore

# signals: the worker's recovery watchdog, hand-off and hard time limits, connected here
# because every process that runs these tasks imports this module first (signals.py).
from . import execution, outcomes, signals, tracing  # noqa: F401
from .dispatch import FINISH_RUN, PHASE_TASK_OPTIONS, RUN_PHASE
from .exceptions import PhaseFailed, PhaseSkipped, RetryPhase
from .models import PhaseState

logger = logging.getLogger("initpipeline")


@shared_task(bind=True, name=RUN_PHASE, ignore_result=True, max_retries=None, **PHASE_TASK_OPTIONS)
def run_phase(self: Any, run_id: int, phase_name: str, advance: bool = False) -> str:
    """Run one phase of a run; ``advance``: it ends its chain (dispatch.send_chain)."""
    try:
        state = execution.execute_phase(
            run_id=run_id,
            phase_name=phase_name,
            task_id=self.request.id or "",
            worker=self.request.hostname or "",
            advance=advance,
        )
    except RetryPhase as retry:
        # self.retry keeps the rest of the chain in the new message.
        raise self.retry(countdown=retry.countdown) from None
    except PhaseSkipped as skipped:
        logger.info("skipping %s of run %s: %s", phase_name, run_id, skipped)
        # Ignore: this copy neither succeeds nor fails, so it sends no next step.
        raise Ignore() from None
    except PhaseFailed:
        # Recorded by outcomes.py; raising stops the chain (no later phase runs).
        raise
    if state in (PhaseState.CANCELLED, outcomes.HANDED_OFF):
        # The run is cancelled, or the phase went back to the queue as a new message
        # (this worker is shutting down): send no next step.
        raise Ignore()
    return state


@shared_task(bind=True, name=FINISH_RUN, acks_late=True, ignore_result=True)
def finish_run(self: Any, run_id: int) -> int | None:
    """Activate the run's generation."""
    # Here, not in task_prerun: Celery's instrumentation, if installed, has made its run/
    # span current by now, and this one nests under it (tracing.py).
    tracing.finish_started(run_id, self.request.id or "")
    generation = outcomes.finish_run(run_id=run_id)
    return generation.pk if generation else None
