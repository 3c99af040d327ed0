"""history.py: earlier timings, the time left, a run's timeline (what the admin shows)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from initpipeline import history
from initpipeline.reporting import run_report
from tests.records import T0, Phase, make_run

pytestmark = [pytest.mark.django_db]

HOUR = timedelta(hours=1)


def test_previous_run_is_the_latest_success_before_the_run() -> None:
    first = make_run("succeeded", [Phase("a", start=0, took=1)], at=T0)
    second = make_run("succeeded", [Phase("a", start=0, took=1)], at=T0 + HOUR)
    make_run("failed", [Phase("a", "failed", start=0, took=1)], at=T0 + 2 * HOUR)
    run = make_run("running", [Phase("a", "running", start=0)], at=T0 + 3 * HOUR)
    later = make_run("succeeded", [Phase("a", start=0, took=1)], at=T0 + 4 * HOUR)
    assert history.previous_run(run) == second
    assert history.previous_run(second) == first
    assert history.previous_run(first) is None
    assert history.previous_run(later) == second


def test_previous_timings_are_the_last_real_durations() -> None:
    make_run(
        "succeeded",
        [Phase("a", start=0, took=4), Phase("b", start=4, took=10), Phase("c", start=14, took=2)],
        at=T0,
    )
    # a cached, b ran for real: a keeps its 4 s, b takes its new 12 s.
    make_run(
        "succeeded",
        [Phase("a", "cached"), Phase("b", start=0, took=12), Phase("c", start=12, took=3)],
        at=T0 + HOUR,
    )
    # A failed run still timed the phases that succeeded in it.
    make_run(
        "failed",
        [
            Phase("a", "cached"),
            Phase("b", start=0, took=11),
            Phase("c", "failed", start=11, took=1),
        ],
        at=T0 + 2 * HOUR,
    )
    run = make_run(
        "pending",
        [Phase("a", "pending"), Phase("b", "pending"), Phase("c", "pending")],
        at=T0 + 3 * HOUR,
    )
    make_run("succeeded", [Phase("a", start=0, took=99)], at=T0 + 4 * HOUR)
    assert history.previous_timings(run) == {"a": 4.0, "b": 11.0, "c": 3.0}


def test_estimate_counts_pending_phases_with_their_last_durations() -> None:
    make_run("succeeded", [Phase("a", start=0, took=4), Phase("b", start=4, took=10)], at=T0)
    run = make_run("pending", [Phase("a", "cached"), Phase("b", "pending")], at=T0 + HOUR)
    assert history.estimate_remaining(run) == 10.0
    assert run_report(run).estimate_remaining == 10.0


def test_estimate_of_the_running_phase_blends_history_and_pace() -> None:
    make_run("succeeded", [Phase("a", start=0, took=10), Phase("b", start=10, took=5)], at=T0)
    run = make_run(
        "running",
        [Phase("a", "running", start=0, done=1, total=4), Phase("b", "pending")],
        at=T0 + HOUR,
    )
    now = T0 + HOUR + timedelta(seconds=6)
    # a: 6 s in, 25 % done. History: 10 - 6 = 4 s left; pace: 6 / 0.25 * 0.75 = 18 s left.
    # Blended by progress: 0.75 * 4 + 0.25 * 18 = 7.5 s; then b's 5 s.
    assert history.estimate_remaining(run, now=now) == pytest.approx(12.5)
    # Past its usual time, the pace alone speaks: 20 s in, 25 % done -> 0.25 * 60 = 15 s.
    later = T0 + HOUR + timedelta(seconds=20)
    assert history.estimate_remaining(run, now=later) == pytest.approx(15.0 + 5.0)


def test_estimate_of_independent_phases_is_the_longest_path() -> None:
    shape = [Phase("left", start=0, took=10), Phase("right", start=0, took=4)]
    make_run("succeeded", [*shape, Phase("join", start=10, took=2)], at=T0)
    independent = {"depends_on": []}
    run = make_run(
        "pending",
        [
            Phase("left", "pending"),
            Phase("right", "pending", extra=independent),
            Phase("join", "pending", extra={"depends_on": ["left", "right"]}),
        ],
        at=T0 + HOUR,
    )
    # left and right side by side (10 s, not 14 s), then join.
    assert history.estimate_remaining(run) == 12.0


def test_estimate_is_unknown_when_a_phase_never_ran() -> None:
    make_run("succeeded", [Phase("a", start=0, took=10)], at=T0)
    run = make_run("pending", [Phase("a", "pending"), Phase("b", "pending")], at=T0 + HOUR)
    assert history.estimate_remaining(run) is None
    assert run_report(run).estimate_remaining is None


@pytest.mark.parametrize(
    ("state", "expected"), [("succeeded", 0.0), ("failed", None), ("cancelled", None)]
)
def test_estimate_of_an_ended_run(state: str, expected: float | None) -> None:
    run = make_run(state, [Phase("a", start=0, took=1)])
    assert history.estimate_remaining(run) == expected


def test_spans_place_phases_on_the_run_time_axis() -> None:
    run = make_run(
        "failed",
        [
            Phase("a", "cached"),
            Phase("b", start=0.5, took=2),
            Phase("c", "failed", start=2.5, took=1),
            Phase("d", "upstream_failed"),
        ],
    )
    assert history.spans(run) == [
        history.Span("a", "cached", None, None),
        history.Span("b", "succeeded", 0.0, 2.0),
        history.Span("c", "failed", 2.0, 1.0),
        history.Span("d", "upstream_failed", None, None),
    ]


def test_overall_progress_is_the_mean_of_the_phases() -> None:
    run = make_run(
        "running",
        [
            Phase("a", "cached"),
            Phase("b", "running", start=0, done=1, total=2),
            Phase("c", "pending"),
        ],
    )
    assert history.overall_progress(run.phases.all()) == pytest.approx(0.5)
    assert history.overall_progress([]) == 0.0
