"""What initpipeline's commands share: NO_COLOR, JSON output, exits, following a run."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn, TextIO

from django.core import checks
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections
from django.db.migrations.executor import MigrationExecutor

from .. import services
from ..formatters import plain_text
from ..models import PipelineRun
from ..reporting import RunReport
from .progress import PlainProgress, RichProgress


class InitCommand(BaseCommand):
    """Base of the commands: colours follow NO_COLOR (https://no-color.org) and ``--no-color``.

    rich reads NO_COLOR by itself; Django does not (its red "CommandError" line on a
    terminal), so a set NO_COLOR turns on ``--no-color`` unless ``--force-color`` is given.
    Every non-zero exit goes through ``exit()``: a CommandError with the documented code and
    a one-line reason, which Django prints to stderr. Broken settings (system check errors)
    and a database that cannot be used exit 2 with one line, as the README says, instead of
    Django's exit 1 with a page of text.
    """

    no_color = False

    def execute(self, *args: Any, **options: Any) -> Any:
        if os.environ.get("NO_COLOR") and not options.get("force_color"):
            options["no_color"] = True
        self.no_color = bool(options.get("no_color"))
        # The stream under self.stdout, for rich's live display (it writes partial lines).
        self.stream: TextIO = options.get("stdout") or sys.stdout
        if not options.get("skip_checks"):
            # Ours instead of Django's: an error exits 2 with one line (Django's, 1 and a page).
            self._check_configuration()
            options["skip_checks"] = True
        try:
            return super().execute(*args, **options)
        except OperationalError as exc:
            # "database is locked" after SQLite's timeout, a server that went away...
            self.exit(2, f"the database cannot be used: {plain_text(str(exc))}")
        except KeyboardInterrupt:
            # Ctrl-C while following a run (--wait, --watch): one line and 128 + SIGINT,
            # as shells and CLI users expect, not a page of traceback. The run goes on.
            self.exit(130, "interrupted; the run goes on (init_status --watch follows it)")

    def _check_configuration(self) -> None:
        errors = [e for e in checks.run_checks() if e.is_serious() and not e.is_silenced()]
        if errors:
            first = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            self.exit(
                2,
                f"configuration error {first.id}: {plain_text(first.msg)}{more}; "
                "run manage.py check for the details",
            )

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
