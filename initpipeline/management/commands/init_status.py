from __future__ import annotations

import json
from typing import Any, TextIO, cast

from django.core.management.base import CommandError, CommandParser

from ... import render, services
from ...exceptions import PipelineConfigError
from ...models import IN_FLIGHT, PhaseRun

EXIT = {"ready": 0, "failed": 1, "not_ready": 3}


class Command(render.TerminalCommand):
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
            data = self._status(run)
            if watch and data["run"] is not None and data["run"]["state"] in IN_FLIGHT:
                self._follow(data["run"]["id"], quiet=json)
                data = self._status(run)
        except PipelineConfigError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        if json:
            self.stdout.write(_dumps(data))
        else:
            self.stdout.write(render.status_text(data, self._phases(data)))
        code = EXIT[data["state"]]
        if code:
            raise SystemExit(code)

    def _status(self, run_id: int | None) -> dict[str, Any]:
        return services.status(run_id=run_id, recover=True)

    def _phases(self, data: dict[str, Any]) -> list[PhaseRun]:
        if data["run"] is None:
            return []
        return list(PhaseRun.objects.filter(run_id=data["run"]["id"]).order_by("position"))

    def _follow(self, run_id: int, *, quiet: bool) -> None:
        if quiet:
            services.wait(run_id, poll=1.0)
            return
        out = cast(TextIO, self.stdout._out)
        if self.stdout.isatty():
            with render.RichProgress(out, no_color=self.no_color) as bars:
                services.wait(run_id, on_update=bars, poll=0.5)
        else:
            self.stdout.write(f"watching run {run_id}")
            services.wait(run_id, on_update=render.PlainProgress(out), poll=1.0)
            self.stdout.write("")


def _dumps(payload: Any) -> str:
    return json.dumps(payload, indent=2)
