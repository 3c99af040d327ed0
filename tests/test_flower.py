"""Flower and the phases' task-progress events, through the event state Flower keeps
(celery.events.state.State, which flower.events.EventsState extends)."""

from __future__ import annotations

import time
from typing import Any

from celery.events.state import State

from initpipeline.contrib.flower import format_task


def event(kind: str, uuid: str = "t1", **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "uuid": uuid,
        "hostname": "w1@host",
        "timestamp": time.time(),
        "local_received": time.time(),
        "clock": 1,
        **fields,
    }


def state_after(*events: dict[str, Any]) -> Any:
    state = State()
    for e in events:
        state.event(e)
    return state.tasks["t1"]


def test_a_progress_event_makes_a_custom_state_whose_fields_flower_does_not_show() -> None:
    task = state_after(
        event("task-received", name="initpipeline.run_phase", args="(3, 'b')"),
        event("task-started"),
        event(
            "task-progress",
            phase="b",
            shard=None,
            run_id=3,
            done=40,
            total=60,
            message="step 40 of 60",
        ),
    )
    assert task.state == "PROGRESS"
    assert task.done == 40
    # What Flower's task page lists (task.html iterates over _fields): no progress.
    assert not {"phase", "done", "total", "message"} & set(task._fields)
    assert "done" not in task.as_dict()
    # format_task puts it where Flower shows it.
    shown = format_task(task)
    assert shown.result == "b: 40 of 60 (67%): step 40 of 60"
    assert shown.as_dict()["result"] == "b: 40 of 60 (67%): step 40 of 60"


def test_a_shard_and_the_end_of_the_task() -> None:
    task = state_after(
        event("task-received", name="initpipeline.run_phase"),
        event("task-started"),
        event("task-progress", phase="embed", shard=3, done=5, total=None, message=""),
    )
    assert format_task(task).result == "embed#3: 5"
    task = state_after(
        event("task-received", name="initpipeline.run_phase"),
        event("task-started"),
        event("task-progress", phase="b", shard=None, done=60, total=60, message="done"),
        event("task-succeeded", result="'succeeded'", runtime=6.0),
    )
    assert task.state == "SUCCESS"
    assert format_task(task).result == "'succeeded'"


def test_other_tasks_are_left_alone() -> None:
    task = state_after(
        event("task-received", name="myapp.other"),
        event("task-started"),
        event("task-progress", done=1, total=2),
    )
    assert format_task(task).result is None
