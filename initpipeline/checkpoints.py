"""Checkpoints: a phase's resumable state, stored like an artifact, kept on its record.

``ctx.checkpoint(state)`` publishes the state (JSON, or a signed pickle when JSON would not
give it back as it was) under a content-addressed key in the artifact storage, so any
worker on any host can resume from it, and records it on the phase's row (``checkpoint``:
key, digest, size, format, progress, time) only while the copy still owns the row. The
next attempt of the phase, in this run or in the next run of the same fingerprint, finds
it as ``ctx.resumed``. A phase that succeeds drops them; ``init_gc`` deletes the rest.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from django.utils import timezone

from . import formats, storage
from .exceptions import ArtifactNotReady
from .models import IN_FLIGHT, PHASE_DONE, Artifact, PhaseRun

logger = logging.getLogger("initpipeline")

#: The storage folder of checkpoints (an artifact name no phase may take: E023).
FOLDER = "_initpipeline-checkpoints"

#: An unreferenced checkpoint younger than this may still be on its way to its record.
GRACE_SECONDS = 3600.0


def _as_json(state: Any) -> bytes | None:
    """The state as JSON, if JSON gives it back equal (tuples, sets... do not survive)."""
    try:
        data = json.dumps(state, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None
    return data.encode() if json.loads(data) == state else None


def save(
    state: Any,
    *,
    run_id: int,
    done: float | None,
    total: float | None,
    phase_run_id: int | None = None,
) -> dict[str, Any]:
    """Publish ``state``; returns the record to keep on the phase's row."""
    data = _as_json(state)
    fmt = "json" if data is not None else "pickle"
    path = storage.new_scratch_path(formats.SUFFIX[fmt], run_id=run_id, phase_run_id=phase_run_id)
    try:
        if data is not None:
            formats.write_bytes(path, data)
        else:
            formats.write_pickle(path, state)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    pub = storage.publish(path, name=FOLDER, suffix=formats.SUFFIX[fmt])
    return {
        "key": pub.key,
        "digest": pub.digest,
        "size": pub.size,
        "format": fmt,
        "done": done,
        "total": total,
        "at": timezone.now().isoformat(),
    }


def _artifact(record: dict[str, Any]) -> Artifact:
    return Artifact(
        name=FOLDER,
        storage_key=record["key"],
        digest=record["digest"],
        size=record["size"],
        format=record["format"],
    )


def load(record: dict[str, Any]) -> Any:
    """The state a checkpoint holds, after checking it; None when it cannot be used (the
    phase then starts from the beginning, which is always correct).

    One that cannot be read back (corrupt, or a pickle of a class since renamed: the
    phase's fingerprint need not change with a helper module's code) is discarded: no later
    attempt or run adopts it again, to fail the same way.
    """
    try:
        path = storage.verify(_artifact(record))
        return formats.read(path, record["format"])
    except ArtifactNotReady as exc:
        logger.warning("checkpoint %s cannot be used (%s): starting over", record.get("key"), exc)
        return None
    except Exception as exc:
        # Unpickling raises whatever the pickled objects' code raises (AttributeError,
        # ModuleNotFoundError, TypeError...), not only UnpicklingError.
        logger.warning(
            "checkpoint %s cannot be read back (%s: %s): discarded, starting over",
            record.get("key"),
            type(exc).__name__,
            exc,
        )
        forget(record)
        return None


def forget(record: dict[str, Any]) -> None:
    """No row points at this checkpoint any more, and its file goes."""
    key = record.get("key")
    if not key:
        return
    PhaseRun.objects.filter(checkpoint__key=key).update(checkpoint=None)
    _delete({key})


def adopt(rows: list[PhaseRun]) -> None:
    """Before a new run is saved: each phase to run resumes from the latest checkpoint of the
    same phase and fingerprint that an earlier run left (it failed or was cancelled)."""
    for pr in rows:
        earlier = (
            PhaseRun.objects.filter(name=pr.name, fingerprint=pr.fingerprint)
            .filter(checkpoint__isnull=False)
            .exclude(state__in=PHASE_DONE)
            .exclude(run__state__in=IN_FLIGHT)
            .order_by("-run__created_at", "-id")
            .values_list("checkpoint", "run_id")
            .first()
        )
        if earlier is not None:
            pr.checkpoint = earlier[0]
            pr.message = f"will resume from the checkpoint run {earlier[1]} left"


def discard(record: dict[str, Any] | None, *, previous: dict[str, Any] | None) -> None:
    """Delete a checkpoint replaced by ``previous`` (a newer one), unless a row points at it."""
    if record is None or (previous is not None and previous["key"] == record["key"]):
        return
    _delete({record["key"]} - referenced())


def drop(*, name: str, fingerprint: str) -> None:
    """The phase succeeded with this fingerprint: delete every checkpoint of it."""
    rows = PhaseRun.objects.filter(name=name, fingerprint=fingerprint, checkpoint__isnull=False)
    keys = {c["key"] for c in rows.values_list("checkpoint", flat=True) if c}
    if not keys:
        return  # Nothing to delete: every row pointing at a checkpoint need not be read.
    rows.update(checkpoint=None)
    _delete(keys - referenced())


def referenced() -> set[str]:
    """The checkpoint keys some row still points at."""
    values = PhaseRun.objects.filter(checkpoint__isnull=False).values_list("checkpoint", flat=True)
    return {c["key"] for c in values if c}


def referenced_digests() -> set[str]:
    """The digests of the checkpoints some row still points at."""
    values = PhaseRun.objects.filter(checkpoint__isnull=False).values_list("checkpoint", flat=True)
    return {c["digest"] for c in values if c and c.get("digest")}


def _delete(keys: set[str]) -> None:
    store = storage.get_storage()
    for key in keys:
        try:
            store.delete(key)
        except OSError as exc:
            logger.warning("could not delete checkpoint %s: %s", key, exc)


def collect(*, dry_run: bool = False) -> list[str]:
    """Delete the checkpoint objects no row points at (init_gc); returns their keys."""
    store = storage.get_storage()
    try:
        _, files = store.listdir(FOLDER)
    except (FileNotFoundError, NotADirectoryError):
        return []
    keep = referenced()
    cutoff = time.time() - GRACE_SECONDS
    gone = []
    for name in files:
        key = f"{FOLDER}/{name}"
        if key in keep:
            continue
        try:
            if store.get_modified_time(key).timestamp() > cutoff:
                continue
        except (FileNotFoundError, NotImplementedError):
            continue
        gone.append(key)
    if not dry_run:
        _delete(set(gone))
    return sorted(gone)
