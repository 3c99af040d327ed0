from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ... import services
from ...models import PipelineRun
from ...reporting import run_report
from ..base import InitCommand


class Command(InitCommand):
    help = (
        "Cancel the run in flight (or run ID): its running phase stops at its next heartbeat "
        "and the active generation keeps serving. Exit codes: 0 cancelled; 1 nothing to "
        "cancel (no run in flight, or the run already ended); 2 bad usage (no such run)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--run", type=int, metavar="ID", help="Cancel this run.")
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, run: int | None, json: bool, **options: Any) -> None:
        if run is not None and not PipelineRun.objects.filter(pk=run).exists():
            self.exit(2, f"there is no run {run}")
        cancelled = services.cancel(run_id=run)
        if cancelled is not None:
            if json:
                self.write_json({"cancelled": True, "run": run_report(cancelled).as_dict()})
            else:
                self.stdout.write(f"run {cancelled.pk} cancelled")
            return
        latest = (
            PipelineRun.objects.filter(pk=run).first()
            if run is not None
            else PipelineRun.objects.latest_first().first()
        )
        if latest is None:
            reason = "nothing to cancel: no run yet"
        else:
            reason = f"nothing to cancel: run {latest.pk} is {latest.state}"
        if json:
            self.write_json(
                {
                    "cancelled": False,
                    "reason": reason,
                    "run": None if latest is None else run_report(latest).as_dict(),
                }
            )
        self.exit(1, reason)
