from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...exceptions import PipelineConfigError
from ...formatters import status_text
from ...recovery import recover_stale
from ...reporting import FAILED, NOT_READY, StatusReport, status_report
from ..base import InitCommand

#: The exit code of each state, and the reason printed with it.
EXIT = {FAILED: (1, "the latest run failed"), NOT_READY: (3, "not ready yet")}


class Command(InitCommand):
    help = (
        "Show the state of the init. Exit codes: 0 the active generation serves and no run "
        "failed since; 1 the latest run failed; 2 bad usage; 3 not ready yet (never run, or "
        "the first run is in progress)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")
        parser.add_argument(
            "--watch",
            action="store_true",
            help="Follow the run in flight until it ends, then show the state "
            "(bars on a terminal, one line per event otherwise).",
        )
        parser.add_argument("--run", type=int, metavar="ID", help="Show this run.")

    def handle(self, *args: Any, json: bool, watch: bool, run: int | None, **options: Any) -> None:
        try:
            report = self._status(run)
            if watch and report.run is not None and report.run.in_flight:
                self.follow(report.run.id, quiet=json, announce=True)
                report = self._status(run)
        except PipelineConfigError as exc:
            self.exit(2, str(exc))
        if json:
            self.write_json(report.as_dict())
        else:
            self.stdout.write(status_text(report))
        if report.state == NOT_READY and report.corrupt:
            self.exit(3, f"not ready: corrupt {', '.join(report.corrupt)}")
        if report.state in EXIT:
            self.exit(*EXIT[report.state])

    def _status(self, run_id: int | None) -> StatusReport:
        # The operator never waits on a run nothing works on: a run left in flight by a
        # lost worker is resumed (or failed) first (recovery.py).
        recover_stale()
        return status_report(run_id=run_id)
