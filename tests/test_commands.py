"""start_init and init_status: exact plain output, exit codes, --help, --json, --run."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.test import override_settings

from initpipeline import formatters
from initpipeline.management.progress import PlainProgress
from initpipeline.models import Artifact, PhaseRun, PipelineRun
from initpipeline.reporting import PhaseReport, RunReport, run_outcome, run_report
from tests.records import T0, Phase, make_generation, make_run

CACHED_MSG = "cached: fingerprint matches a verified artifact"


def init_status(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("init_status", *args, stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue()
    return 0, out.getvalue()


def help_text(name: str) -> str:
    parser = load_command_class("initpipeline", name).create_parser("manage.py", name)
    return " ".join(parser.format_help().split())


# -- --help --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "codes"),
    [
        (
            "start_init",
            "Exit codes: 0 up to date, enqueued, or (with --wait) succeeded, and always with "
            "--dry-run; 1 the run failed or was cancelled; 2 bad usage or configuration.",
        ),
        (
            "init_status",
            "Exit codes: 0 the active generation serves and no run failed since; 1 the latest "
            "run failed; 2 bad usage; 3 not ready yet (never run, or the first run is in "
            "progress).",
        ),
        ("init_gc", "Exit codes: 0 done; 2 bad usage."),
    ],
)
def test_help_states_the_exit_codes(name: str, codes: str) -> None:
    assert codes in help_text(name)


# -- init_status -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_init_status_before_any_run() -> None:
    assert init_status() == (
        3,
        "state: not_ready   active generation: none\nno run yet: python manage.py start_init\n",
    )


@pytest.fixture
def history() -> Iterator[dict[str, int]]:
    """Run 1 succeeded (generation active), run 2 failed at b.

    Run 1 was planned before phase runs kept a reason: its cached phase says why in its
    message, as start() wrote it then.
    """
    first = make_run(
        "succeeded",
        [
            Phase("a", start=0, took=1.5, done=10, total=10, message="step 10 of 10"),
            Phase("b", start=1.5, took=75, done=1, total=1),
            Phase("c", "cached", message=CACHED_MSG),
        ],
        trigger="start_init",
    )
    generation = make_generation(first, [("a_out", "json", 62), ("b_out", "npy", 2048)])
    failed = make_run(
        "failed",
        [
            Phase("a", "cached", reason="unchanged"),
            Phase(
                "b",
                "failed",
                reason="code changed",
                start=0,
                took=0.25,
                attempt=3,
                max_attempts=3,
                done=2,
                total=8,
                message="step 2 of 8",
                error="RuntimeError: b was told to fail",
                traceback="Traceback (most recent call last):\nRuntimeError: b was told to fail",
                extra={"losses": 1},
            ),
            Phase("c", "upstream_failed", reason="input changed: b", message="not run: b failed"),
        ],
        at=T0 + timedelta(hours=1),
        trigger="admin: run again by ops",
        error="phase b failed: RuntimeError: b was told to fail",
    )
    yield {"first": first.pk, "generation": generation.pk, "failed": failed.pk}


@pytest.mark.django_db
def test_init_status_of_a_failed_latest_run(history: dict[str, int]) -> None:
    code, out = init_status()
    assert code == 1
    assert out == (
        f"state: failed   active generation: {history['generation']} (run {history['first']})\n"
        f"run {history['failed']}: failed   started 2025-03-04 11:00:00 UTC   took 0.2 s   "
        "by admin: run again by ops\n"
        "error: phase b failed: RuntimeError: b was told to fail\n"
        "PHASE  STATE            REASON            PROGRESS  ATTEMPT  LOST  DURATION  MESSAGE\n"
        "a      cached           unchanged         100%      0/1      0/3   -\n"
        "b      failed           code changed      25%       3/3      1/3   0.2 s     "
        "RuntimeError: b was told to fail\n"
        "c      upstream_failed  input changed: b  0%        0/1      0/3   -         "
        "not run: b failed\n"
        f"artifacts of generation {history['generation']}:\n"
        "  a_out  json  62 B     blake3:615f6f757461\n"
        "  b_out  npy   2.0 KiB  blake3:625f6f757462\n"
    )


@pytest.mark.django_db
def test_init_status_of_an_older_run(history: dict[str, int]) -> None:
    code, out = init_status("--run", str(history["first"]))
    # The exit code is the state of the init, whichever run is shown.
    assert code == 1
    assert out.splitlines()[1:6] == [
        f"run {history['first']}: succeeded   started 2025-03-04 10:00:00 UTC   took 1m16s   "
        "by start_init",
        # Planned before runs kept reasons: "-".
        "PHASE  STATE      REASON  PROGRESS  ATTEMPT  LOST  DURATION  MESSAGE",
        "a      succeeded  -       100%      1/1      0/3   1.5 s     step 10 of 10",
        "b      succeeded  -       100%      1/1      0/3   1m15s",
        f"c      cached     -       100%      0/1      0/3   -         {CACHED_MSG}",
    ]


@pytest.mark.django_db
def test_init_status_when_ready_exits_0(history: dict[str, int]) -> None:
    PipelineRun.objects.filter(pk=history["failed"]).delete()
    code, out = init_status()
    assert code == 0
    assert out.startswith(
        f"state: ready   active generation: {history['generation']} (run {history['first']})\n"
    )


@pytest.mark.django_db
def test_init_status_of_a_run_in_flight_shows_the_time_left(history: dict[str, int]) -> None:
    run = make_run(
        "running",
        [
            Phase("a", "cached", message=CACHED_MSG),
            Phase("b", "pending"),
            Phase("c", "pending"),
        ],
        at=T0 + timedelta(hours=2),
        trigger="start_init",
    )
    code, out = init_status()
    assert code == 0
    # b last took 75 s for real, c never ran for real: unknown.
    assert out.splitlines()[1] == (
        f"run {run.pk}: running   created 2025-03-04 12:00:00 UTC   time left unknown   "
        "by start_init"
    )
    PhaseRun.objects.filter(run=run, name="c").update(state="cached")
    PhaseRun.objects.filter(run=run, name="b").update(state="running", started_at=run.created_at)
    PipelineRun.objects.filter(pk=run.pk).update(started_at=run.created_at)
    line = init_status()[1].splitlines()[1]
    assert re.fullmatch(
        rf"run {run.pk}: running   started 2025-03-04 12:00:00 UTC   for \S+   "
        r"about 0\.0 s left   by start_init",
        line,
    ), line


@pytest.mark.django_db
def test_init_status_watch_without_a_run_in_flight_prints_the_status_once(
    history: dict[str, int],
) -> None:
    assert init_status("--watch") == init_status()


@pytest.mark.django_db
def test_init_status_json(history: dict[str, int]) -> None:
    code, out = init_status("--json")
    assert code == 1
    data = json.loads(out)
    assert data["state"] == "failed"
    assert data["active_generation"]["artifacts"] == [
        {
            "name": "a_out",
            "digest": "blake3:" + ("615f6f7574" * 7)[:64],
            "size": 62,
            "format": "json",
        },
        {
            "name": "b_out",
            "digest": "blake3:" + ("625f6f7574" * 7)[:64],
            "size": 2048,
            "format": "npy",
        },
    ]
    assert data["run"]["id"] == history["failed"]
    assert data["run"]["estimate_remaining"] is None
    assert [p["state"] for p in data["run"]["phases"]] == ["cached", "failed", "upstream_failed"]
    assert [p["reason"] for p in data["run"]["phases"]] == [
        "unchanged",
        "code changed",
        "input changed: b",
    ]
    code, out = init_status("--json", "--run", str(history["first"]))
    assert [p["reason"] for p in json.loads(out)["run"]["phases"]] == [None, None, None]


@pytest.mark.django_db
def test_init_status_of_an_unknown_run_is_bad_usage() -> None:
    with pytest.raises(CommandError) as exc:
        call_command("init_status", "--run", "99", stdout=io.StringIO())
    assert (str(exc.value), exc.value.returncode) == ("there is no run 99", 2)


# -- start_init's summary ------------------------------------------------------------------


@pytest.mark.django_db
def test_summary_lists_durations_cached_phases_and_artifacts(history: dict[str, int]) -> None:
    first = PipelineRun.objects.get(pk=history["first"])
    run = make_run(
        "succeeded",
        [
            Phase("a", "cached", message=CACHED_MSG),
            Phase("b", start=0, took=3.25),
            Phase("c", start=3.25, took=0.5),
        ],
        at=T0 + timedelta(hours=3),
    )
    generation = make_generation(run, [("b_out", "npy", 4_500_000), ("c_out", "json", 17)])
    generation.artifacts.add(Artifact.objects.get(name="a_out", run=first))
    assert formatters.summary_text(run_report(run), run_outcome(run)) == (
        f"run {run.pk} succeeded in 3.8 s\n"
        "  a  cached     -\n"
        "  b  succeeded  3.2 s\n"
        "  c  succeeded  0.5 s\n"
        "cached: a\n"
        f"artifacts of generation {generation.pk} (active):\n"
        f"  a_out  json  62 B     blake3:615f6f757461  from run {first.pk}\n"
        "  b_out  npy   4.3 MiB  blake3:625f6f757462\n"
        "  c_out  json  17 B     blake3:635f6f757463"
    )


@pytest.mark.django_db
def test_summary_of_a_failed_run_lists_what_it_published(history: dict[str, int]) -> None:
    failed = PipelineRun.objects.get(pk=history["failed"])
    Artifact.objects.create(
        name="a_out",
        fingerprint="fp-new",
        storage_key="a_out/new.json",
        digest="blake3:" + "ab" * 32,
        size=70,
        format="json",
        run=failed,
    )
    assert formatters.summary_text(run_report(failed), run_outcome(failed)) == (
        f"run {failed.pk} failed in 0.2 s\n"
        "  a  cached           -\n"
        "  b  failed           0.2 s\n"
        "  c  upstream_failed  -\n"
        "cached: a\n"
        "artifacts published, not active:\n"
        "  a_out  json  70 B  blake3:abababababab\n"
        "error: phase b failed: RuntimeError: b was told to fail"
    )


# -- plain progress lines --------------------------------------------------------------------


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def phase(name: str, state: str, **fields: object) -> PhaseRun:
    return PhaseRun(name=name, state=state, max_attempts=3, **fields)  # type: ignore[misc]


def poll(phases: list[PhaseRun]) -> RunReport:
    """A poll of a run, as services.wait() hands it to a live renderer."""
    return RunReport(
        id=1,
        state="running",
        trigger="",
        created_at=at(0),
        started_at=at(0),
        finished_at=None,
        duration=None,
        error="",
        phases=[PhaseReport.of(p) for p in phases],
        estimate_remaining=None,
    )


def test_plain_progress_prints_each_event_once() -> None:
    out = io.StringIO()
    plain = PlainProgress(out, now=lambda: at(600))
    polls = [
        # 1: z is cached, a has just started.
        [
            phase("z", "cached", message=CACHED_MSG),
            phase("a", "running", attempt=1, started_at=at(1)),
            phase("b", "pending"),
            phase("c", "pending"),
        ],
        # 2 and 3: a makes progress; 47 % is in the same tenth as 45 %.
        [
            phase(
                "a",
                "running",
                attempt=1,
                started_at=at(1),
                progress_done=45,
                progress_total=100,
                message="step 45 of 100",
            )
        ],
        [
            phase(
                "a",
                "running",
                attempt=1,
                started_at=at(1),
                progress_done=47,
                progress_total=100,
                message="step 47 of 100",
            )
        ],
        # 4: a ended; b ran and ended between two polls.
        [
            phase("a", "succeeded", attempt=1, started_at=at(1), finished_at=at(3.5)),
            phase("b", "succeeded", attempt=1, started_at=at(3.5), finished_at=at(64)),
        ],
        # 5: c's first attempt failed and waits for a retry.
        [
            phase(
                "c",
                "pending",
                attempt=1,
                started_at=at(64),
                error="RuntimeError: c fails attempt 1",
            )
        ],
        # 6: attempt 2 runs; 7: attempt 3 (never seen running) failed for good.
        [phase("c", "running", attempt=2, started_at=at(64))],
        [
            phase(
                "c",
                "failed",
                attempt=3,
                started_at=at(64),
                finished_at=at(70),
                error="RuntimeError: no\nmore",
            )
        ],
        [
            phase(
                "c",
                "failed",
                attempt=3,
                started_at=at(64),
                finished_at=at(70),
                error="RuntimeError: no",
            )
        ],
    ]
    for phases in polls:
        plain(poll(phases))
    assert out.getvalue() == (
        "10:10:00 z cached\n"
        "10:00:01 a running\n"
        "10:10:00 a 45% step 45 of 100\n"
        "10:00:03 a succeeded in 2.5 s\n"
        "10:00:03 b running\n"
        "10:01:04 b succeeded in 1m00s\n"
        "10:01:04 c running\n"
        "10:10:00 c attempt 1 failed: RuntimeError: c fails attempt 1; retrying\n"
        "10:10:00 c running (attempt 2/3)\n"
        "10:10:00 c running (attempt 3/3)\n"
        "10:01:10 c failed: RuntimeError: no\n"
    )


def test_plain_progress_ends_phases_that_never_ran() -> None:
    out = io.StringIO()
    plain = PlainProgress(out, now=lambda: at(5))
    plain(
        poll(
            [
                phase(
                    "a",
                    "cancelled",
                    attempt=1,
                    started_at=at(0),
                    finished_at=at(2),
                    message="cancelled; stopped after 2.0 s",
                ),
                phase("b", "cancelled", finished_at=at(2), message="cancelled"),
                phase("c", "upstream_failed", message="not run: a failed"),
            ]
        )
    )
    assert out.getvalue() == (
        "10:00:00 a running\n"
        "10:00:02 a cancelled; stopped after 2.0 s\n"
        "10:00:02 b cancelled\n"
        "10:00:05 c upstream_failed: not run: a failed\n"
    )


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (46_137_344, "44.0 MiB"),
        (3 << 40, "3072.0 GiB"),
    ],
)
def test_fmt_size(size: int, text: str) -> None:
    assert formatters.fmt_size(size) == text


# -- broken settings -----------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["start_init", "init_status", "cancel_init", "init_gc"])
def test_broken_settings_exit_2_with_one_line(name: str) -> None:
    with (
        override_settings(INITPIPELINE={"STALE_AFTER": -1, "QUEUE": 7}),
        pytest.raises(CommandError) as exc,
    ):
        # As from the command line: call_command skips the checks unless told not to.
        call_command(name, stdout=io.StringIO(), skip_checks=False)
    assert exc.value.returncode == 2
    assert str(exc.value) == (
        "configuration error initpipeline.E014: INITPIPELINE['STALE_AFTER'] must be a positive "
        "number, not -1. (and 1 more); run manage.py check for the details"
    )
