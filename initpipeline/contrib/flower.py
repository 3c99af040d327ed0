"""A phase's progress in Flower: ``format_task`` for Flower's ``flowerconfig.py``.

What Flower does with our ``task-progress`` events (read in its source, flower 2.x): its
``EventsState`` hands every event to Celery's ``celery.events.state.State``, which treats
an unknown task event type as a custom state: the task's state becomes ``PROGRESS`` and
the event's fields (phase, shard, run_id, done, total, message) are set on the task
object. Flower's task page and tasks table, however, show only the fields Celery's
``Task._fields`` names, so the numbers never appear, only the ``PROGRESS`` badge. Flower
lets a ``format_task(task)`` function of ``flowerconfig.py`` change a copy of each task
before it is shown (page, table and API alike): this one writes the progress into the
task's ``result`` while the phase runs.

    # flowerconfig.py
    from initpipeline.contrib.flower import format_task

Nothing here imports Flower or Django: it reads the task object only.
"""

from __future__ import annotations

from typing import Any

#: The phase task's name (dispatch.RUN_PHASE; not imported: flowerconfig.py has no Django).
RUN_PHASE = "initpipeline.run_phase"


def progress_line(task: Any) -> str | None:
    """``"b: 40 of 60 (67%): step 40 of 60"`` for a phase task whose last event was
    progress, else None."""
    if getattr(task, "name", None) != RUN_PHASE or getattr(task, "state", None) != "PROGRESS":
        return None
    fields = getattr(task, "__dict__", {})
    done, total = fields.get("done"), fields.get("total")
    if done is None:
        return None
    phase = str(fields.get("phase") or "?")
    shard = fields.get("shard")
    where = phase if shard is None else f"{phase}#{shard}"
    if total:
        amount = f"{float(done):g} of {float(total):g} ({100 * float(done) / float(total):.0f}%)"
    else:
        amount = f"{float(done):g}"
    message = str(fields.get("message") or "")
    return f"{where}: {amount}" + (f": {message}" if message else "")


def format_task(task: Any) -> Any:
    """Flower's ``format_task`` hook: a running phase's progress in its ``result``."""
    line = progress_line(task)
    if line is not None:
        task.result = line
    return task
