"""Terminal output shared by start_init and init_status: plain text, or rich on a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from .models import PhaseRun, PhaseState, PipelineRun


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
                (
                    p.error.splitlines()[-1]
                    if p.error and p.state == PhaseState.FAILED
                    else p.message
                )[:60],
            ]
        )
    return rows


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def status_text(data: dict[str, Any], phases: Sequence[PhaseRun]) -> str:
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
        lines.append(
            f"run {run['id']}: {run['state']}"
            + (f"   started by {run['trigger']}" if run["trigger"] else "")
        )
        if run["error"]:
            lines.append(f"error: {run['error']}")
        lines.append(table(phase_rows(phases)))
    return "\n".join(lines)


def summary_text(run: PipelineRun, phases: Sequence[PhaseRun]) -> str:
    lines = [f"run {run.pk} {run.state} in {fmt_duration(run.duration)}"]
    width = max((len(p.name) for p in phases), default=0)
    for p in phases:
        dur = "cached" if p.state == PhaseState.CACHED else fmt_duration(p.duration)
        lines.append(f"  {p.name.ljust(width)}  {p.state:<15} {dur}")
    cached = [p.name for p in phases if p.state == PhaseState.CACHED]
    if cached:
        lines.append(f"cached: {', '.join(cached)}")
    if run.error:
        lines.append(f"error: {run.error}")
    return "\n".join(lines)


class PlainProgress:
    """Timestamped lines for logs: one per state change and per 10 % of progress."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.seen: dict[str, tuple[str, int, str]] = {}

    def __call__(self, run: PipelineRun, phases: Sequence[PhaseRun]) -> None:
        for p in phases:
            step = int(p.progress * 10)
            key = (p.state, step, p.message if p.state != PhaseState.RUNNING else "")
            if self.seen.get(p.name) == key:
                continue
            first = p.name not in self.seen
            self.seen[p.name] = key
            if first and p.state == PhaseState.PENDING:
                continue
            stamp = datetime.now().strftime("%H:%M:%S")
            text = f"{stamp} {p.name} {p.state}"
            if p.state == PhaseState.RUNNING:
                text += f" {p.progress * 100:.0f}%"
            msg = (
                p.error.splitlines()[-1] if p.state == PhaseState.FAILED and p.error else p.message
            )
            if msg:
                text += f" {msg}"
            self.out.write(text + "\n")
            self.out.flush()


class RichProgress:
    """Live bars, one per phase, on a terminal (rich honours NO_COLOR)."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(file=out)
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
