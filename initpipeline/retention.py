"""Deleting the files of old generations, never those a reader may still map."""

from __future__ import annotations

import logging
import time

from django.db.models import Q

from .conf import settings
from .models import IN_FLIGHT, Artifact, Generation
from .storage import get_storage, scratch_dir

logger = logging.getLogger("initpipeline")


def collect(*, keep: int | None = None, dry_run: bool = False) -> list[Artifact]:
    """Delete the files of artifacts no kept generation or recent run uses; return them.

    Kept: the files of the ``keep`` (KEEP_GENERATIONS) most recently activated generations
    and of the active one, so a web process still serving an older generation for up to
    REFRESH_INTERVAL never loses a file under it; and every artifact made since the oldest
    kept generation (a failed run's finished phases are what the next run resumes from).
    The records stay: history is never rewritten, and a record whose file is gone simply
    stops counting as a cache.
    """
    keep = int(settings.KEEP_GENERATIONS if keep is None else keep)
    if keep < 1:
        raise ValueError("keep must be at least 1: the active generation is never deleted")
    kept = list(
        Generation.objects.filter(activated_at__isnull=False).order_by("-activated_at", "-id")[
            :keep
        ]
    )
    kept += list(Generation.objects.filter(is_active=True))
    if not kept:
        return []
    oldest = min(g.created_at for g in kept)
    protected = set(
        Artifact.objects.filter(
            Q(generations__in=kept) | Q(created_at__gte=oldest) | Q(run__state__in=IN_FLIGHT)
        ).values_list("storage_key", flat=True)
    )
    if not dry_run:
        _remove_stale_scratch()
    storage = get_storage()
    removed: list[Artifact] = []
    seen: set[str] = set()
    for art in Artifact.objects.exclude(storage_key__in=protected).order_by("created_at"):
        if art.storage_key in seen:
            continue
        seen.add(art.storage_key)
        if not storage.exists(art.storage_key):
            continue
        if not dry_run:
            storage.delete(art.storage_key)
        removed.append(art)
    if removed and not dry_run:
        logger.info("deleted the files of %d old artifacts", len(removed))
    return removed


def _remove_stale_scratch() -> None:
    """Delete scratch files a killed worker left, once no phase can still be writing them."""
    # A phase writes its scratch files within its hard time limit; twice the longest
    # default limit, and at least a day, is well past any writer.
    max_age = max(2 * settings.DEFAULT_TIMEOUT, 86400.0)
    cutoff = time.time() - max_age
    for path in scratch_dir().glob("*.part*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            pass
