from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ... import checkpoints, retention
from ..base import InitCommand


class Command(InitCommand):
    help = (
        "Delete the files of artifacts older than the last KEEP_GENERATIONS generations, "
        "and this host's cached copies of them; never the active one, nor what a run in "
        "flight will activate. Exit codes: 0 done; 2 bad usage."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--keep", type=int, help="Generations to keep (KEEP_GENERATIONS).")
        parser.add_argument("--dry-run", action="store_true", help="Only list what would go.")

    def handle(self, *args: Any, keep: int | None, dry_run: bool, **options: Any) -> None:
        try:
            removed = retention.collect(keep=keep, dry_run=dry_run)
        except ValueError as exc:
            self.exit(2, str(exc))
        verb = "would delete" if dry_run else "deleted"
        for art in removed:
            self.stdout.write(f"{verb} {art.storage_key} ({art.size} bytes)")
        total = sum(a.size for a in removed)
        self.stdout.write(f"{verb} {len(removed)} files, {total} bytes")
        # Checkpoints that no phase of any run points at any more (a crash between saving
        # one and recording it, runs long ended).
        dropped = checkpoints.collect(dry_run=dry_run)
        if dropped:
            self.stdout.write(f"{verb} {len(dropped)} checkpoints nothing points at")
        # This host's copies of what the storage no longer keeps (web processes prune
        # their host's cache at each switch; a worker's host has this command).
        local = retention.prune_local(keep=keep, dry_run=dry_run)
        if local:
            size = sum(n for _, n in local)
            self.stdout.write(f"{verb} {len(local)} entries of this host's cache, {size} bytes")
