"""Deleting the files of old generations, never those a reader may still map or a run in
flight will activate."""

from __future__ import annotations

import logging
import re
import stat
import time
from pathlib import Path

from django.core.exceptions import SuspiciousOperation
from django.db.models import Q, QuerySet

from . import checkpoints, digests
from .conf import settings
from .exceptions import UnknownDigest
from .models import IN_FLIGHT, Artifact, Generation, PhaseRun, PipelineRun
from .storage import cache_dir, get_storage, remove_tree, scratch_dir, scratch_run

logger = logging.getLogger("initpipeline")

#: The most generations ``keep`` may name (more is a typo, and a database LIMIT overflow).
MAX_KEEP = 10_000


def collect(*, keep: int | None = None, dry_run: bool = False) -> list[Artifact]:
    """Delete the files of artifacts no kept generation or run in flight uses; return them.

    Kept: the files of the ``keep`` (KEEP_GENERATIONS) most recently activated generations
    and of the active one, so a web process still serving an older generation for up to
    REFRESH_INTERVAL never loses a file under it; every artifact made since the oldest of
    those recent generations (a failed run's finished phases are what the next run resumes
    from);
    and every artifact a run in flight made or will activate (its phases' fingerprints:
    a cached phase's artifact may be old). The records stay: history is never rewritten,
    and a record whose file is gone simply stops counting as a cache.
    """
    kept = _kept(keep)
    if not dry_run:
        _remove_stale_scratch()
    if kept is None:
        return []
    protected = set(kept.values_list("storage_key", flat=True))
    storage = get_storage()
    removed: list[Artifact] = []
    seen: set[str] = set()
    for art in Artifact.objects.exclude(storage_key__in=protected).order_by("created_at"):
        if art.storage_key in seen:
            continue
        seen.add(art.storage_key)
        try:
            if not storage.exists(art.storage_key):
                continue
            if not dry_run:
                storage.delete(art.storage_key)
        except (SuspiciousOperation, OSError, ValueError) as exc:
            # One bad record (a key outside the storage, a file the storage refuses) must
            # not keep the others from being collected.
            logger.warning("skipped artifact %s (%s): %s", art.pk, art.storage_key[:200], exc)
            continue
        removed.append(art)
    if removed and not dry_run:
        logger.info("deleted the files of %d old artifacts", len(removed))
    return removed


def _kept(keep: int | None) -> QuerySet[Artifact] | None:
    """The artifacts whose files are kept (collect's rule); None before any generation."""
    keep = int(settings.KEEP_GENERATIONS if keep is None else keep)
    if not 1 <= keep <= MAX_KEEP:
        raise ValueError(
            f"keep must be from 1 to {MAX_KEEP}, not {keep}: the active generation is never deleted"
        )
    recent = list(
        Generation.objects.filter(activated_at__isnull=False).order_by("-activated_at", "-id")[
            :keep
        ]
    )
    kept = recent + list(Generation.objects.filter(is_active=True))
    if not kept:
        return None
    # From the recent generations, not the active one: an old active generation (a
    # rollback) must not keep every newer artifact for ever.
    oldest = min(g.created_at for g in recent or kept)
    planned = PhaseRun.objects.filter(run__state__in=IN_FLIGHT).values("fingerprint")
    return Artifact.objects.filter(
        Q(generations__in=kept)
        | Q(created_at__gte=oldest)
        | Q(run__state__in=IN_FLIGHT)
        | Q(fingerprint__in=planned)
    )


#: The name of what LOCAL_CACHE_DIR holds for one file: its digest (storage.local_path,
#: storage._unpacked, hostcache.record_path), then a suffix.
_BY_DIGEST = re.compile(r"(?:[a-z0-9]+-)?[0-9a-f]{64}")
#: Entries changed this many seconds before prune_local() began count as made after it
#: (file times are coarser than the clock).
RECENT = 2.0


def prune_local(*, keep: int | None = None, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Delete what this host holds in ``LOCAL_CACHE_DIR`` for files the storage no longer
    keeps (collect's rule) and no checkpoint record points at: the copies of a remote
    storage's files, the unpacked folders of directory artifacts, and the records of what
    the host verified. Returns (path, bytes) of each.

    Without it a host's cache grows by each generation's artifacts for ever (a directory
    artifact twice: its archive and its folder). Nothing changed since this call began is
    touched: an artifact recorded after the query below is not in it, but a copy of it can
    only have been made after its record.
    """
    started = time.time()
    kept = _kept(keep)
    if kept is None:
        return []
    digests_kept = set(kept.values_list("digest", flat=True).distinct())
    digests_kept |= checkpoints.referenced_digests()
    names = set()
    for digest in digests_kept:
        try:
            names.add(digests.name_part(digest))
        except UnknownDigest:
            continue
    root = cache_dir()
    removed = []
    for folder in (root, root / "dirs", root / "verified"):
        try:
            entries = list(folder.iterdir())
        except FileNotFoundError:
            continue
        for path in entries:
            if not _BY_DIGEST.fullmatch(path.name.split(".", 1)[0]):
                continue
            if path.name.split(".", 1)[0] in names:
                continue
            try:
                st = path.lstat()
                if st.st_ctime >= started - RECENT:
                    continue
                size = _size(path) if stat.S_ISDIR(st.st_mode) else st.st_size
                if not dry_run:
                    if stat.S_ISDIR(st.st_mode):
                        remove_tree(path)
                    else:
                        path.unlink()
            except FileNotFoundError:
                continue  # Another process of the host pruned it first.
            except OSError as exc:
                logger.warning("could not delete %s from this host's cache: %s", path, exc)
                continue
            removed.append((path, size))
    if removed and not dry_run:
        logger.info(
            "deleted %d files and folders (%d bytes) from this host's cache",
            len(removed),
            sum(size for _, size in removed),
        )
    return removed


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _remove_stale_scratch() -> None:
    """Delete scratch files that no phase can still be writing.

    A scratch file named for its run (storage.new_scratch_path) goes once that run has
    ended; one without a run (written by an older version) once it is older than any
    phase may run: twice the longest default limit, and at least a day.
    """
    in_flight = set(PipelineRun.objects.in_flight().values_list("pk", flat=True))
    cutoff = time.time() - max(2 * settings.DEFAULT_TIMEOUT, 86400.0)
    for path in scratch_dir().glob("*.part*"):
        run_id = scratch_run(path)
        try:
            if (
                run_id is not None
                and run_id not in in_flight
                or (run_id is None and path.stat().st_mtime < cutoff)
            ):
                path.unlink()
        except FileNotFoundError:
            pass


def forget_scratch_of(run_id: int, phase_run_id: int) -> None:
    """Delete what a copy of this phase left in the scratch folder: a new copy claimed it,
    so the one that wrote them is gone (a SIGKILL during a write, say)."""
    for path in scratch_dir().glob(f"r{run_id}-p{phase_run_id}-*.part*"):
        path.unlink(missing_ok=True)
