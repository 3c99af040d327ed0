"""Live progress of a run for start_init --wait and init_status --watch.

Plain lines for logs and pipes, rich bars on a terminal. Every plain line a phase
produces is one of (``HH:MM:SS`` in the current Django time zone)::

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

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from django.utils import timezone

from ..formatters import clock, first_line, fmt_duration, plain_text
from ..models import PhaseState
from ..reporting import PhaseReport, RunReport


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
        self.out.write(f"{clock(when or self.now())} {name} {text}\n")
        self.out.flush()

    def __call__(self, run: RunReport) -> None:
        for p in run.lanes():
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
                    message = f" {plain_text(p.message)}" if p.message else ""
                    self._emit(None, p.name, f"{p.progress * 100:.0f}%{message}")
            elif p.state == PhaseState.PENDING:
                if p.attempt and p.error and seen.retry_reported < p.attempt:
                    seen.retry_reported = p.attempt
                    error = first_line(p.error)
                    self._emit(None, p.name, f"attempt {p.attempt} failed: {error}; retrying")
            else:
                seen.ended = True
                self._emit(p.finished_at, p.name, self._end(p))

    @staticmethod
    def _end(p: PhaseReport) -> str:
        if p.state == PhaseState.SUCCEEDED:
            return f"succeeded in {fmt_duration(p.duration)}"
        if p.state == PhaseState.FAILED:
            return f"failed: {first_line(p.error) or plain_text(p.message)}"
        # "cancelled; stopped after 2.0 s" says it all; "not run: b failed" needs the state.
        message = plain_text(p.message)
        if message.startswith(p.state):
            return message
        return f"{p.state}: {message}" if message else str(p.state)


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
            # markup=False: a message is text, "[/tmp]" included (rich reads [..] as markup).
            TextColumn("{task.fields[message]}", style="dim", markup=False),
            console=self.console,
        )
        self.tasks: dict[str, Any] = {}
        self.run_task: Any = None

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, run: RunReport) -> None:
        # First the run itself: which one this is, its state and its overall progress.
        head: dict[str, Any] = {"name": f"run {run.id}", "state": run.state, "message": ""}
        if self.run_task is None:
            self.run_task = self.progress.add_task("run", total=1.0, **head)
        self.progress.update(self.run_task, completed=run.progress, **head)
        for p in run.lanes():
            fields: dict[str, Any] = {
                "name": p.name,
                "state": p.state,
                "message": plain_text(p.message)[:50],
            }
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
