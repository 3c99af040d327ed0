"""Text of the init's state for terminals and logs, from the reports of reporting.py.

The plain text is an interface: logs are grepped and tests compare it line by line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from django.utils import timezone

from . import digests
from .models import PhaseState, RunState
from .reporting import (
    ArtifactReport,
    PhaseReport,
    RunOutcome,
    RunReport,
    StatusReport,
    WebProcessReport,
)

if TYPE_CHECKING:
    from .planning import Plan

# Terminal escape sequences (CSI, OSC) whole, then any control character left.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def plain_text(text: str) -> str:
    """``text`` as one line of plain text: no escape sequences, no control characters.

    Phase messages and errors come from user code and from exceptions; a terminal must
    not interpret them (colours, cursor moves, a title change).
    """
    return _CONTROL.sub(" ", _ESCAPES.sub("", text)).strip()


def storable(text: str) -> str:
    """``text`` as every database stores it: lone surrogates (what ``Path.name`` gives for
    a file name that is not UTF-8, ``caf\\udce9``) become U+FFFD, and NUL characters (which
    PostgreSQL refuses in text) go. A message, an error or a traceback from user code must
    never keep its own failure from being recorded."""
    text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


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


def clock(value: datetime) -> str:
    """A time of day in the current time zone (the plain progress lines)."""
    return timezone.localtime(value).strftime("%H:%M:%S")


def first_line(text: str) -> str:
    return plain_text(text.strip().splitlines()[0]) if text.strip() else ""


def phase_rows(phases: Sequence[PhaseReport]) -> list[list[str]]:
    rows = [["PHASE", "STATE", "REASON", "PROGRESS", "ATTEMPT", "LOST", "DURATION", "MESSAGE"]]
    for p in (lane for phase in phases for lane in phase.lanes()):
        rows.append(
            [
                p.name,
                p.state,
                p.reason or "-",
                f"{p.progress * 100:.0f}%",
                f"{p.attempt}/{p.max_attempts}",
                f"{p.losses}/{p.max_losses}",
                fmt_duration(p.duration),
                (
                    first_line(p.error)
                    if p.error and p.state == PhaseState.FAILED
                    else plain_text(p.message)
                )[:60],
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


def artifact_lines(artifacts: Sequence[ArtifactReport], *, run_id: int | None = None) -> list[str]:
    """One line per artifact; those another run published are marked "from run N"."""
    rows = []
    for a in sorted(artifacts, key=lambda a: a.name):
        origin = f"from run {a.run_id}" if run_id is not None and a.run_id != run_id else ""
        rows.append([a.name, a.format, fmt_size(a.size), digests.short(a.digest), origin])
    return table(rows, indent="  ").splitlines() if rows else []


def run_line(run: RunReport) -> str:
    parts = [f"run {run.id}: {run.state}"]
    if run.started_at is not None:
        parts.append(f"started {fmt_time(run.started_at)}")
        end = run.finished_at or timezone.now()
        took = (end - run.started_at).total_seconds()
        parts.append(f"{'took' if run.finished_at is not None else 'for'} {fmt_duration(took)}")
    else:
        parts.append(f"created {fmt_time(run.created_at)}")
    if run.state in (RunState.PENDING, RunState.RUNNING):
        estimate = run.estimate_remaining
        parts.append(
            "time left unknown" if estimate is None else f"about {fmt_duration(estimate)} left"
        )
    if run.trigger:
        parts.append(f"by {run.trigger}")
    return "   ".join(parts)


def status_text(report: StatusReport) -> str:
    """What ``init_status`` prints: the state, the run and its phases, the active artifacts."""
    gen = report.active
    head = f"state: {report.state}"
    if gen is None:
        head += "   active generation: none"
    else:
        head += f"   active generation: {gen.id} (run {gen.run_id})"
    lines = [head]
    for name, reason in report.corrupt.items():
        lines.append(f"corrupt: {name}: {plain_text(reason)}; start_init rebuilds it")
    run = report.run
    if run is None:
        lines.append("no run yet: python manage.py start_init")
    else:
        lines.append(run_line(run))
        if run.error:
            lines.append(f"error: {first_line(run.error)}")
        lines.append(table(phase_rows(run.phases)))
    if gen is not None and gen.artifacts:
        lines.append(f"artifacts of generation {gen.id}:")
        rows = [
            [a.name, a.format, fmt_size(a.size), digests.short(a.digest)] for a in gen.artifacts
        ]
        lines.append(table(rows, indent="  "))
    lines.extend(web_lines(report.web))
    return "\n".join(lines)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def web_lines(web: Sequence[WebProcessReport]) -> list[str]:
    """What the web processes serve, per server: which generation, what loads, what fails."""
    if not web:
        return []
    lines = ["web processes (as they last reported):"]
    servers: dict[tuple[str, str], list[WebProcessReport]] = {}
    for w in web:
        servers.setdefault((w.host, w.server), []).append(w)
    for (host, server), procs in servers.items():
        counts: dict[int | None, int] = {}
        for w in procs:
            counts[w.generation] = counts.get(w.generation, 0) + 1
        parts = [
            f"{n} on generation {g}" if g is not None else f"{n} with nothing loaded yet"
            for g, n in sorted(counts.items(), key=lambda item: -(item[0] or 0))
        ]
        where = f"{host}, {server}" if server else host
        lines.append(
            f"  {where}: {_plural(len(procs), 'process', 'processes')}: {', '.join(parts)}"
        )
        for w in procs:
            if w.loading:
                target = f" of generation {w.loading_generation}" if w.loading_generation else ""
                lines.append(f"    pid {w.pid} loading {', '.join(w.loading)}{target}")
            for name, (error, attempts) in sorted(w.failures.items()):
                lines.append(
                    f"    pid {w.pid}: {name} failed to load ({_plural(attempts, 'attempt')}): "
                    f"{first_line(error)}"
                )
    return lines


def summary_text(run: RunReport, outcome: RunOutcome) -> str:
    """The end of ``start_init --wait``: durations, cached phases, artifacts."""
    lines = [f"run {run.id} {run.state} in {fmt_duration(run.duration)}"]
    rows = [
        [p.name, p.state, "-" if p.state == PhaseState.CACHED else fmt_duration(p.duration)]
        for p in run.phases
    ]
    if rows:
        lines.append(table(rows, indent="  "))
    cached = [p.name for p in run.phases if p.state == PhaseState.CACHED]
    if cached:
        lines.append(f"cached: {', '.join(cached)}")
    generation = outcome.generation
    if generation is not None:
        active = " (active)" if generation.is_active else ""
        lines.append(f"artifacts of generation {generation.id}{active}:")
        lines.extend(artifact_lines(generation.artifacts, run_id=run.id))
    elif outcome.published:
        lines.append("artifacts published, not active:")
        lines.extend(artifact_lines(outcome.published))
    if run.error:
        lines.append(f"error: {first_line(run.error)}")
    return "\n".join(lines)


def plan_text(plan: Plan, *, in_flight: int | None = None) -> str:
    """What ``start_init --dry-run`` prints: ``NAME  run|cached  REASON`` per phase, then
    one summary line."""
    rows = [[plain_text(p.name), p.action, plain_text(p.reason)] for p in plan.phases]
    lines = [table(rows)] if rows else []
    to_run = plan.to_run
    if plan.up_to_date:
        assert plan.active is not None
        summary = f"up to date: generation {plan.active.pk} is active"
    elif to_run:
        total = len(plan.phases)
        summary = f"{len(to_run)} of {total} phase{'s' if total != 1 else ''} to run"
    else:
        summary = "nothing to run: a run would activate the cached artifacts"
    if in_flight is not None:
        summary += f"; run {in_flight} is in flight, so start_init would attach to it"
    lines.append(summary)
    return "\n".join(lines)
