"""Terminal output shared by start_init and init_status: plain text, or rich on a terminal.

The plain text is an interface: logs are grepped and tests compare it line by line. Every
line a phase produces is one of (``HH:MM:SS`` in the current Django time zone)::

    HH:MM:SS NAME cached
    HH:MM:SS NAME running                      (" (attempt 2/3)" on a retry)
    HH:MM:SS NAME 40% MESSAGE                  progress, once per 10 %, as polled
    HH:MM:SS NAME attempt 1 failed: ERROR; retrying
    HH:MM:SS NAME succeeded in 1.2 s
    HH:MM:SS NAME failed: ERROR
    HH:MM:SS NAME upstream_failed: MESSAGE
    HH:MM:SS NAME cancelled                    (or the phase's message, if it says so)

The "running" and end lines are printed for every phase that ran, even when a poll missed
its running state, so they do not depend on the poll's timing; progress and "retrying"
lines do (a poll can miss them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from django.core.management.base import BaseCommand
from django.utils import timezone

from .models import Artifact, Generation, PhaseRun, PhaseState, PipelineRun, RunState


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_size(size: int) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 44.0 MiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_time(value: datetime | None) -> str:
    """A timestamp in the current time zone, to the second."""
    if value is None:
        return "-"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z")


def _clock(value: datetime) -> str:
    return timezone.localtime(value).strftime("%H:%M:%S")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def phase_rows(phases: Sequence[PhaseRun]) -> list[list[str]]:
    rows = [["PHASE", "STATE", "PROGRESS", "ATTEMPT", "DURATION", "MESSAGE"]]
    for p in phases:
        rows.append(
            [
                p.name,
                p.state,
                f"{p.progress * 100:.0f}%",
                f"{p.attempt}/{p.max_attempts}",
                fmt_duration(p.duration),
                (_first_line(p.error) if p.error and p.state == PhaseState.FAILED else p.message)[
                    :60
                ],
            ]
        )
    return rows


def table(rows: list[list[str]], indent: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def artifact_lines(artifacts: Sequence[Artifact], *, run_id: int | None = None) -> list[str]:
    """One line per artifact; those another run published are marked "from run N"."""
    rows = []
    for a in sorted(artifacts, key=lambda a: a.name):
        origin = f"from run {a.run_id}" if run_id is not None and a.run_id != run_id else ""
        rows.append([a.name, a.format, fmt_size(a.size), f"sha256 {a.sha256[:12]}", origin])
    return table(rows, indent="  ").splitlines() if rows else []


def _run_line(run: Mapping[str, Any]) -> str:
    parts = [f"run {run['id']}: {run['state']}"]
    started = run["started_at"]
    if started is not None:
        parts.append(f"started {fmt_time(datetime.fromisoformat(started))}")
        finished = run["finished_at"]
        end = datetime.fromisoformat(finished) if finished is not None else timezone.now()
        took = (end - datetime.fromisoformat(started)).total_seconds()
        parts.append(f"{'took' if finished is not None else 'for'} {fmt_duration(took)}")
    else:
        parts.append(f"created {fmt_time(datetime.fromisoformat(run['created_at']))}")
    if run["state"] in (RunState.PENDING, RunState.RUNNING):
        estimate = run.get("estimate_remaining")
        parts.append(
            "time left unknown" if estimate is None else f"about {fmt_duration(estimate)} left"
        )
    if run["trigger"]:
        parts.append(f"by {run['trigger']}")
    return "   ".join(parts)


def status_text(data: Mapping[str, Any], phases: Sequence[PhaseRun]) -> str:
    """What ``init_status`` prints: the state, the run and its phases, the active artifacts."""
    gen = data["active_generation"]
    head = f"state: {data['state']}"
    if gen is None:
        head += "   active generation: none"
    else:
        head += f"   active generation: {gen['id']} (run {gen['run']})"
    lines = [head]
    run = data["run"]
    if run is None:
        lines.append("no run yet: python manage.py start_init")
    else:
        lines.append(_run_line(run))
        if run["error"]:
            lines.append(f"error: {_first_line(run['error'])}")
        lines.append(table(phase_rows(phases)))
    if gen is not None and gen["artifacts"]:
        lines.append(f"artifacts of generation {gen['id']}:")
        rows = [
            [a["name"], a["format"], fmt_size(a["size"]), f"sha256 {a['sha256'][:12]}"]
            for a in gen["artifacts"]
        ]
        lines.append(table(rows, indent="  "))
    return "\n".join(lines)


def summary_text(run: PipelineRun, phases: Sequence[PhaseRun]) -> str:
    """The end of ``start_init --wait``: durations, cached phases, artifacts."""
    lines = [f"run {run.pk} {run.state} in {fmt_duration(run.duration)}"]
    rows = [
        [p.name, p.state, "-" if p.state == PhaseState.CACHED else fmt_duration(p.duration)]
        for p in phases
    ]
    if rows:
        lines.append(table(rows, indent="  "))
    cached = [p.name for p in phases if p.state == PhaseState.CACHED]
    if cached:
        lines.append(f"cached: {', '.join(cached)}")
    generation = Generation.objects.filter(run=run).first()
    if generation is not None:
        active = " (active)" if generation.is_active else ""
        lines.append(f"artifacts of generation {generation.pk}{active}:")
        lines.extend(artifact_lines(list(generation.artifacts.all()), run_id=run.pk))
    else:
        published = list(run.artifacts.all())
        if published:
            lines.append("artifacts published, not active:")
            lines.extend(artifact_lines(published))
    if run.error:
        lines.append(f"error: {_first_line(run.error)}")
    return "\n".join(lines)


@dataclass
class _Seen:
    attempt: int = 0
    step: int = 0
    retry_reported: int = 0
    ended: bool = False


class PlainProgress:
    """Timestamped lines for logs and pipes (the module docstring lists them)."""

    def __init__(self, out: TextIO, *, now: Callable[[], datetime] = timezone.now) -> None:
        self.out = out
        self.now = now
        self.seen: dict[str, _Seen] = {}

    def _emit(self, when: datetime | None, name: str, text: str) -> None:
        self.out.write(f"{_clock(when or self.now())} {name} {text}\n")
        self.out.flush()

    def __call__(self, run: PipelineRun, phases: Sequence[PhaseRun]) -> None:
        for p in phases:
            seen = self.seen.setdefault(p.name, _Seen())
            if seen.ended:
                continue
            if p.state == PhaseState.CACHED:
                self._emit(None, p.name, "cached")
                seen.ended = True
                continue
            if p.attempt > seen.attempt:
                # A new attempt started (or one we did not see running has ended).
                retry = f" (attempt {p.attempt}/{p.max_attempts})" if p.attempt > 1 else ""
                first = p.attempt == 1
                self._emit(p.started_at if first else None, p.name, f"running{retry}")
                seen.attempt, seen.step = p.attempt, 0
            if p.state == PhaseState.RUNNING:
                step = int(p.progress * 10)
                if 0 < step < 10 and step > seen.step:
                    seen.step = step
                    message = f" {p.message}" if p.message else ""
                    self._emit(None, p.name, f"{p.progress * 100:.0f}%{message}")
            elif p.state == PhaseState.PENDING:
                if p.attempt and p.error and seen.retry_reported < p.attempt:
                    seen.retry_reported = p.attempt
                    error = _first_line(p.error)
                    self._emit(None, p.name, f"attempt {p.attempt} failed: {error}; retrying")
            else:
                seen.ended = True
                self._emit(p.finished_at, p.name, self._end(p))

    @staticmethod
    def _end(p: PhaseRun) -> str:
        if p.state == PhaseState.SUCCEEDED:
            return f"succeeded in {fmt_duration(p.duration)}"
        if p.state == PhaseState.FAILED:
            return f"failed: {_first_line(p.error) or p.message}"
        # "cancelled; stopped after 2.0 s" says it all; "not run: b failed" needs the state.
        if p.message.startswith(p.state):
            return p.message
        return f"{p.state}: {p.message}" if p.message else str(p.state)


class TerminalCommand(BaseCommand):
    """A command whose colours follow NO_COLOR (https://no-color.org) and ``--no-color``.

    rich reads NO_COLOR by itself; Django does not (its red "CommandError" line on a
    terminal), so a set NO_COLOR turns on ``--no-color`` unless ``--force-color`` is given.
    """

    no_color = False

    def execute(self, *args: Any, **options: Any) -> Any:
        if os.environ.get("NO_COLOR") and not options.get("force_color"):
            options["no_color"] = True
        self.no_color = bool(options.get("no_color"))
        return super().execute(*args, **options)


class RichProgress:
    """Live bars, one per phase, on a terminal (rich honours NO_COLOR and TERM=dumb)."""

    def __init__(self, out: TextIO, *, no_color: bool = False) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        # None lets rich read NO_COLOR itself; True is --no-color.
        self.console = Console(file=out, no_color=True if no_color else None)
        self.progress = Progress(
            TextColumn("{task.fields[name]:<20}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[state]:<15}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[message]}", style="dim"),
            console=self.console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, run: PipelineRun, phases: Sequence[PhaseRun]) -> None:
        for p in phases:
            fields: dict[str, Any] = {"name": p.name, "state": p.state, "message": p.message[:50]}
            if p.name not in self.tasks:
                self.tasks[p.name] = self.progress.add_task(
                    p.name, total=1.0, start=p.started_at is not None, **fields
                )
            task = self.tasks[p.name]
            if p.started_at is not None:
                self.progress.start_task(task)
            self.progress.update(task, completed=p.progress, **fields)
            if p.state not in (PhaseState.PENDING, PhaseState.RUNNING):
                self.progress.stop_task(task)
