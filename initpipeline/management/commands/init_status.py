from __future__ import annotations

import json
import time
from typing import Any, TextIO, cast

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections

from ... import render, services
from ...exceptions import PipelineConfigError
from ...models import IN_FLIGHT, PhaseRun

EXIT = {"ready": 0, "failed": 1, "not_ready": 3}


class Command(BaseCommand):
    help = (
        "Show the state of the init. Exit codes: 0 the active generation serves and no run "
        "failed since; 1 the latest run failed; 2 bad usage; 3 not ready yet (never run, or "
        "the first run is in progress)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")
        parser.add_argument(
            "--watch", action="store_true", help="Refresh until the run in flight ends."
        )
        parser.add_argument("--run", type=int, metavar="ID", help="Show this run.")

    def handle(self, *args: Any, json: bool, watch: bool, run: int | None, **options: Any) -> None:
        try:
            data = self._status(run)
            if watch and not json:
                data = self._watch(run)
            elif watch:
                while data["run"] is not None and data["run"]["state"] in IN_FLIGHT:
                    time.sleep(1)
                    data = self._status(run)
        except PipelineConfigError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        if json:
            self.stdout.write(_dumps(data))
        elif not watch:
            self.stdout.write(render.status_text(data, self._phases(data)))
        code = EXIT[data["state"]]
        if code:
            raise SystemExit(code)

    def _status(self, run_id: int | None) -> dict[str, Any]:
        close_old_connections()
        return services.status(run_id=run_id)

    def _phases(self, data: dict[str, Any]) -> list[PhaseRun]:
        if data["run"] is None:
            return []
        return list(PhaseRun.objects.filter(run_id=data["run"]["id"]).order_by("position"))

    def _watch(self, run_id: int | None) -> dict[str, Any]:
        if self.stdout.isatty():
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            console = Console(file=cast(TextIO, self.stdout._out))
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    data = self._status(run_id)
                    live.update(Text(render.status_text(data, self._phases(data))), refresh=True)
                    if data["run"] is None or data["run"]["state"] not in IN_FLIGHT:
                        return data
                    time.sleep(1)
        last = ""
        while True:
            data = self._status(run_id)
            text = render.status_text(data, self._phases(data))
            if text != last:
                self.stdout.write(text + "\n")
                last = text
            if data["run"] is None or data["run"]["state"] not in IN_FLIGHT:
                return data
            time.sleep(1)


def _dumps(payload: Any) -> str:
    return json.dumps(payload, indent=2)
