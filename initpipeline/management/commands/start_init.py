from __future__ import annotations

import json
from typing import Any, TextIO, cast

from django.core.management.base import CommandError, CommandParser

from ... import render, services
from ...exceptions import EnqueueError, PipelineConfigError
from ...models import PipelineRun, RunState


class Command(render.TerminalCommand):
    help = (
        "Start the init pipeline, or attach to the run in flight. Exit codes: 0 up to date, "
        "enqueued, or (with --wait) succeeded; 1 the run failed or was cancelled; 2 bad usage "
        "or configuration."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--wait", action="store_true", help="Wait for the run to end.")
        parser.add_argument(
            "--force", action="store_true", help="Run every phase, even the cached ones."
        )
        parser.add_argument(
            "--from", dest="from_phase", metavar="PHASE", help="Re-run PHASE and its dependants."
        )
        parser.add_argument(
            "--only", nargs="+", default=[], metavar="PHASE", help="Re-run just these phases."
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(
        self,
        *args: Any,
        wait: bool,
        force: bool,
        from_phase: str | None,
        only: list[str],
        json: bool,
        **options: Any,
    ) -> None:
        try:
            result = services.start(
                force=force, from_phase=from_phase, only=only, trigger="start_init"
            )
        except (PipelineConfigError, EnqueueError) as exc:
            raise CommandError(str(exc), returncode=2) from exc

        run = result.run
        if not json:
            if result.outcome == services.UP_TO_DATE:
                gen = result.generation
                self.stdout.write(f"up to date: generation {gen.pk if gen else '?'} is active")
            elif result.outcome == services.ATTACHED:
                assert run is not None
                self.stdout.write(f"run {run.pk} is already {run.state}; attached to it")
            else:
                assert run is not None
                self.stdout.write(f"run {run.pk} enqueued")

        if wait and run is not None:
            run = self._wait(run.pk, quiet=json)
        if json:
            payload = {
                "outcome": result.outcome,
                "generation": result.generation.pk if result.generation else None,
                "run": services.run_dict(run) if run is not None else None,
            }
            self.stdout.write(_dumps(payload))
        if wait and run is not None and run.state != RunState.SUCCEEDED:
            raise CommandError(f"run {run.pk} {run.state}: {run.error}", returncode=1)

    def _wait(self, run_id: int, *, quiet: bool) -> PipelineRun:
        if quiet:
            return services.wait(run_id)
        out = cast(TextIO, self.stdout._out)
        if self.stdout.isatty():
            # Bars on a terminal; rich reads NO_COLOR (and TERM=dumb) from the environment.
            with render.RichProgress(out, no_color=self.no_color) as bars:
                run = services.wait(run_id, on_update=bars, poll=0.25)
        else:
            # Logs and pipes get one line per event (render.py lists them).
            run = services.wait(run_id, on_update=render.PlainProgress(out), poll=0.5)
        self.stdout.write(render.summary_text(run, list(run.phases.order_by("position"))))
        return run


def _dumps(payload: Any) -> str:
    return json.dumps(payload, indent=2)
