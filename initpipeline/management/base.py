"""What initpipeline's commands share: NO_COLOR, JSON output, exits, following a run."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn, TextIO

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor

from .. import services
from ..models import PipelineRun
from ..reporting import RunReport
from .progress import PlainProgress, RichProgress


class InitCommand(BaseCommand):
    """Base of the commands: colours follow NO_COLOR (https://no-color.org) and ``--no-color``.

    rich reads NO_COLOR by itself; Django does not (its red "CommandError" line on a
    terminal), so a set NO_COLOR turns on ``--no-color`` unless ``--force-color`` is given.
    Every non-zero exit goes through ``exit()``: a CommandError with the documented code and
    a one-line reason, which Django prints to stderr.
    """

    no_color = False

    def execute(self, *args: Any, **options: Any) -> Any:
        if os.environ.get("NO_COLOR") and not options.get("force_color"):
            options["no_color"] = True
        self.no_color = bool(options.get("no_color"))
        # The stream under self.stdout, for rich's live display (it writes partial lines).
        self.stream: TextIO = options.get("stdout") or sys.stdout
        return super().execute(*args, **options)

    def exit(self, code: int, reason: str) -> NoReturn:
        raise CommandError(reason, returncode=code)

    def require_migrated(self) -> None:
        """Exit 2 when the database lacks migrations of this app: its queries would fail.

        A deploy pipeline may run ``start_init --dry-run`` before its ``migrate`` step.
        """
        executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
        leaves = executor.loader.graph.leaf_nodes(PipelineRun._meta.app_label)
        missing = executor.migration_plan(leaves)
        if missing:
            names = ", ".join(f"{m.app_label}.{m.name}" for m, _ in missing)
            self.exit(2, f"the database lacks migrations {names}: run `manage.py migrate` first")

    def write_json(self, payload: Any) -> None:
        self.stdout.write(json.dumps(payload, indent=2))

    def follow(self, run_id: int, *, quiet: bool, announce: bool = False) -> RunReport:
        """Wait for the run to end: bars on a terminal, plain lines otherwise, or nothing."""
        if quiet:
            return services.wait(run_id, poll=1.0)
        if self.stdout.isatty():
            # rich reads NO_COLOR (and TERM=dumb) from the environment.
            with RichProgress(self.stream, no_color=self.no_color) as bars:
                return services.wait(run_id, on_update=bars, poll=0.25)
        if announce:
            self.stdout.write(f"watching run {run_id}")
        # Logs and pipes get one line per event (progress.py lists them).
        run = services.wait(run_id, on_update=PlainProgress(self.stream), poll=0.5)
        if announce:
            self.stdout.write("")
        return run
