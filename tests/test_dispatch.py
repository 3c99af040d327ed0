"""dispatch.py: the chains a run's records call for, and what is sent, by task name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from celery import current_app
from django.test import override_settings

from initpipeline import dispatch
from initpipeline.models import PhaseRun, PipelineRun


def records(shape: dict[str, list[str]], **states: str) -> list[PhaseRun]:
    """Unsaved phase records of a run: ``shape`` maps each phase to what it waits for."""
    return [
        PhaseRun(name=name, position=i, depends_on=deps, state=states.get(name, "pending"))
        for i, (name, deps) in enumerate(shape.items())
    ]


LINEAR = {"a": [], "b": ["a"], "c": ["b"]}
DIAMOND = {"top": [], "left": ["top"], "right": ["top"], "join": ["left", "right"]}
TWO_BRANCHES = {"x1": [], "x2": ["x1"], "y1": [], "y2": ["y1"], "end": ["x2", "y2"]}


def test_a_linear_pipeline_is_one_chain() -> None:
    assert dispatch.plan_chains(records(LINEAR)) == [["a", "b", "c"]]
    assert dispatch.plan_chains(records(LINEAR, a="succeeded")) == [["b", "c"]]
    assert dispatch.plan_chains(records(LINEAR, a="cached", b="running")) == []


def test_independent_phases_start_as_separate_chains() -> None:
    assert dispatch.plan_chains(records(TWO_BRANCHES)) == [["x1", "x2"], ["y1", "y2"]]
    assert dispatch.plan_chains(records(DIAMOND)) == [["top"]]
    assert dispatch.plan_chains(records(DIAMOND, top="succeeded")) == [["left"], ["right"]]
    # The join waits for both sides: with one done, it follows the other in its chain.
    assert dispatch.plan_chains(records(DIAMOND, top="cached", left="succeeded")) == [
        ["right", "join"]
    ]
    assert dispatch.plan_chains(records(DIAMOND, top="cached", left="running")) == [["right"]]
    done = {"top": "cached", "left": "succeeded", "right": "succeeded"}
    assert dispatch.plan_chains(records(DIAMOND, **done)) == [["join"]]
    # A phase whose only dependency is cached starts at once.
    assert dispatch.plan_chains(records(TWO_BRANCHES, x1="cached")) == [["x2"], ["y1", "y2"]]
    assert dispatch.plan_chains(records(TWO_BRANCHES), start=["y1"]) == [["y1", "y2"]]


# -- sending ------------------------------------------------------------------------------


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The messages send_chain publishes (through Celery's send_task), instead of sending."""
    calls: list[dict[str, Any]] = []

    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        calls.append({"task": name, "args": list(args), "kwargs": kwargs or {}, **options})

    monkeypatch.setattr(current_app, "send_task", send_task)
    return calls


def saved(shape: dict[str, list[str]], **states: str) -> PipelineRun:
    run = PipelineRun.objects.create(state="running")
    for pr in records(shape, **states):
        pr.run, pr.fingerprint, pr.timeout = run, f"fp-{pr.name}", 100
        pr.save()
    return run


@pytest.mark.django_db
def test_a_chain_is_sent_by_task_name_with_the_limits_of_the_records(
    published: list[dict[str, Any]],
) -> None:
    run = saved(LINEAR)
    with override_settings(INITPIPELINE={"QUEUE": "init"}):
        dispatch.send_chain(run.pk, ["a", "b", "c"])
    # One message: the first step, carrying the rest of the chain (FIELD_NOTES, Celery).
    assert len(published) == 1
    first = published[0]
    assert (first["task"], first["args"], first["kwargs"]) == (
        "initpipeline.run_phase",
        [run.pk, "a"],
        {},
    )
    assert (first["soft_time_limit"], first["time_limit"]) == (100, 100 + dispatch.HARD_LIMIT_GRACE)
    assert first["queue"] == "init"
    rest = [(s["task"], list(s["args"]), s["kwargs"]) for s in reversed(first["chain"])]
    # The chain holds every phase left, so it ends with the finish step, not an advance.
    assert rest == [
        ("initpipeline.run_phase", [run.pk, "b"], {}),
        ("initpipeline.run_phase", [run.pk, "c"], {}),
        ("initpipeline.finish_run", [run.pk], {}),
    ]


@pytest.mark.django_db
def test_a_chain_that_leaves_phases_to_others_advances_the_run(
    published: list[dict[str, Any]],
) -> None:
    run = saved(TWO_BRANCHES)
    dispatch.send_chain(run.pk, ["x1", "x2"])
    first = published[0]
    assert (first["args"], first["kwargs"]) == ([run.pk, "x1"], {})
    assert [(list(s["args"]), s["kwargs"]) for s in first["chain"]] == [
        ([run.pk, "x2"], {"advance": True})
    ]


# -- Celery is imported only to send ------------------------------------------------------

WEB_START = """
import sys
import project.wsgi  # what Gunicorn imports: settings, apps (admin included), URLs
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("celery", "kombu", "billiard"))
from initpipeline import dispatch
app = dispatch.celery_app()
from celery.signals import worker_ready
before = [r[0][0] for r in worker_ready.receivers]
import initpipeline.tasks  # what a worker imports to find the tasks
after = [r[0][0] for r in worker_ready.receivers]
print(loaded, app.main, "initpipeline.start_watchdog" in before,
      "initpipeline.start_watchdog" in after)
"""


def test_a_web_process_imports_celery_only_to_send(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "INITPIPELINE_VAR_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", WEB_START],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Nothing of Celery at start; INITPIPELINE["CELERY_APP"] on the first send; the
    # worker's signals once the tasks are imported, as a worker does.
    assert result.stdout.split("\n")[-2] == "[] project False True"


@pytest.mark.django_db
def test_the_chains_a_phase_unblocks_go_over_one_connection(
    published: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    django_assert_num_queries: Any,
) -> None:
    run = saved(TWO_BRANCHES)
    opened = []
    real = dispatch.connection

    @contextlib.contextmanager
    def counted() -> Iterator[Any]:
        opened.append(1)
        with real() as conn:
            yield conn

    monkeypatch.setattr(dispatch, "connection", counted)
    with django_assert_num_queries(1):
        dispatch.send_chains(run.pk, [["x1"], ["y1"]])
    assert len(opened) == 1
    assert [m["args"] for m in published] == [[run.pk, "x1"], [run.pk, "y1"]]
