from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ... import services
from ...exceptions import EnqueueError, PipelineConfigError
from ...formatters import plan_text, summary_text
from ...models import PipelineRun, RunState
from ...reporting import run_outcome, run_report
from ..base import InitCommand


class Command(InitCommand):
    help = (
        "Start the init pipeline, or attach to the run in flight; with --dry-run, print what "
        "it would run and why, and start nothing. Exit codes: 0 up to date, enqueued, or "
        "(with --wait) succeeded, and always with --dry-run; 1 the run failed or was "
        "cancelled; 2 bad usage or configuration."
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
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Print each phase, run or cached, and why; create no run, send nothing.",
        )

    def handle(
        self,
        *args: Any,
        wait: bool,
        force: bool,
        from_phase: str | None,
        only: list[str],
        json: bool,
        dry_run: bool,
        **options: Any,
    ) -> None:
        self.require_migrated()
        if dry_run:
            if wait:
                self.exit(2, "--dry-run starts nothing to --wait for")
            self.dry_run(force=force, from_phase=from_phase, only=only, json=json)
            return
        try:
            result = services.start(
                force=force, from_phase=from_phase, only=only, trigger="start_init"
            )
        except (PipelineConfigError, EnqueueError) as exc:
            self.exit(2, str(exc))

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
                if result.superseded is not None:
                    self.stdout.write(
                        f"run {result.superseded.pk} cancelled: {result.superseded.error}"
                    )
                self.stdout.write(f"run {run.pk} enqueued")

        report = None
        if run is not None:
            if wait:
                self.follow(run.pk, quiet=json)
                run = PipelineRun.objects.get(pk=run.pk)
            report = run_report(run)
            if wait and not json:
                self.stdout.write(summary_text(report, run_outcome(run)))
        if json:
            self.write_json(
                {
                    "outcome": result.outcome,
                    "superseded": result.superseded.pk if result.superseded else None,
                    "generation": result.generation.pk if result.generation else None,
                    "run": None if report is None else report.as_dict(),
                }
            )
        if wait and report is not None and report.state != RunState.SUCCEEDED:
            self.exit(1, f"run {report.id} {report.state}: {report.error}")

    def dry_run(self, *, force: bool, from_phase: str | None, only: list[str], json: bool) -> None:
        """The plan start() would follow now (services.plan), on stdout; reads only."""
        try:
            plan = services.plan(force=force, from_phase=from_phase, only=only)
        except PipelineConfigError as exc:
            self.exit(2, str(exc))
        if json:
            self.write_json(plan.as_dict())
            return
        in_flight = PipelineRun.objects.in_flight().values_list("pk", flat=True).first()
        self.stdout.write(plan_text(plan, in_flight=in_flight))
