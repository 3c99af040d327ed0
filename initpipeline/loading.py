"""The per-process artifact cache: lazy loads, a throttled look at the active generation."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError

from . import formats, storage
from .conf import settings
from .exceptions import ArtifactCorrupt, ArtifactNotReady

logger = logging.getLogger("initpipeline")


@dataclass(frozen=True)
class Record:
    """What a web process needs to know of one active artifact."""

    name: str
    pk: int
    storage_key: str
    sha256: str
    size: int
    format: str

    def as_artifact(self) -> Any:
        """An unsaved Artifact with these fields, for storage.verify() and problem()."""
        from .models import Artifact

        return Artifact(
            pk=self.pk,
            name=self.name,
            storage_key=self.storage_key,
            sha256=self.sha256,
            size=self.size,
            format=self.format,
        )


@dataclass(frozen=True)
class Snapshot:
    generation_id: int | None
    records: dict[str, Record]


#: Seconds a process answers "not ready" from what it saw last (capped by
#: REFRESH_INTERVAL): a crowd hitting the warming-up page or /init/readyz during the init
#: costs the database a few queries per second per process, not one per request, and a
#: page turns ready at most this much later.
NOT_READY_INTERVAL = 0.25


def not_ready_interval() -> float:
    return min(NOT_READY_INTERVAL, settings.REFRESH_INTERVAL)


class ActiveGeneration:
    """This process's view of the active generation, refreshed at most every
    ``REFRESH_INTERVAL`` seconds so the hot path costs no query; while something is
    missing, at most every ``not_ready_interval()`` (``recent()``), and the init's public
    progress with it (``progress()``)."""

    def __init__(self) -> None:
        self._snapshot = Snapshot(None, {})
        self._checked_at = float("-inf")
        self._error: str | None = None
        self._lock = threading.Lock()
        self._progress: tuple[float, dict[str, Any]] | None = None
        self._progress_lock = threading.Lock()
        # sha256 -> reason, for files this process found corrupt (reported by /init/readyz).
        self.corrupt: dict[str, str] = {}

    def snapshot(self) -> Snapshot:
        interval = settings.REFRESH_INTERVAL
        if time.monotonic() - self._checked_at < interval and self._error is None:
            return self._snapshot  # The hot path of every artifact().get(): no call more.
        return self._within(interval)

    def recent(self) -> Snapshot:
        """The snapshot, looked at again if older than ``not_ready_interval()``: for a
        request that found an artifact missing, so that it turns ready soon."""
        return self._within(not_ready_interval())

    def _within(self, max_age: float) -> Snapshot:
        if time.monotonic() - self._checked_at >= max_age:
            with self._lock:
                if time.monotonic() - self._checked_at >= max_age:
                    try:
                        self._snapshot = self._query()
                        self._error = None
                    except ArtifactNotReady as exc:
                        # No generation known and no database: say so without asking it
                        # again for every request of the interval.
                        self._error = str(exc)
                    self._checked_at = time.monotonic()
        if self._error is not None:
            raise ArtifactNotReady(self._error)
        return self._snapshot

    def refresh(self) -> Snapshot:
        """Look at the database now (tests, and after an activation in this process)."""
        self._checked_at = float("-inf")
        return self.snapshot()

    def progress(self, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The init's public progress: ``build()``'s answer, built again at most every
        ``not_ready_interval()``. Shared by every request of the process: do not change it."""
        cached = self._progress
        if cached is None or time.monotonic() - cached[0] >= not_ready_interval():
            with self._progress_lock:
                cached = self._progress
                if cached is None or time.monotonic() - cached[0] >= not_ready_interval():
                    cached = (time.monotonic(), build())
                    self._progress = cached
        return cached[1]

    def _query(self) -> Snapshot:
        from .models import Artifact, Generation

        try:
            gen_id = Generation.objects.filter(is_active=True).values_list("pk", flat=True).first()
            if gen_id is None:
                return Snapshot(None, {})
            if gen_id == self._snapshot.generation_id:
                return self._snapshot
            rows = Artifact.objects.filter(generations=gen_id).values_list(
                "name", "pk", "storage_key", "sha256", "size", "format"
            )
            return Snapshot(gen_id, {r[0]: Record(*r) for r in rows})
        except DatabaseError as exc:
            # Keep serving what we had: a database hiccup must not take loaded
            # artifacts away from a site that already works.
            logger.warning("cannot read the active generation: %s", exc)
            if self._snapshot.generation_id is None:
                raise ArtifactNotReady(f"cannot read the active generation: {exc}") from exc
            return self._snapshot


active = ActiveGeneration()


class ArtifactHandle:
    """A lazy handle on one artifact of the active generation.

    ``artifact("lsa")`` does no I/O; ``.get()`` loads the artifact on first use in this
    process (after checking its sha256), caches it, and returns the cached object until a
    newer generation carries different bytes. Arrays come memory-mapped read-only, so every
    Gunicorn worker shares one copy in the page cache. A request keeps the object it got:
    a generation switch never changes an object under a running request.

    Raises ``ArtifactNotReady`` while no active generation has the artifact, and
    ``ArtifactCorrupt`` when its file fails the checksum (it is then never used).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loaded: tuple[str, Any] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"artifact({self.name!r})"

    def record(self) -> Record:
        rec = active.snapshot().records.get(self.name)
        if rec is None:
            raise ArtifactNotReady(f"artifact {self.name!r} is not active yet")
        return rec

    def ready(self) -> bool:
        """True when the active generation has this artifact (no file I/O).

        While it is missing, the database is looked at again every
        ``not_ready_interval()``, so a page turns ready soon after the generation is
        active; once present, the check is free.
        """
        try:
            return self.name in active.snapshot().records or self.name in active.recent().records
        except ArtifactNotReady:
            return False

    def get(self) -> Any:
        rec = self.record()
        loaded = self._loaded
        if loaded is not None and loaded[0] == rec.sha256:
            return loaded[1]
        with self._lock:
            loaded = self._loaded
            if loaded is not None and loaded[0] == rec.sha256:
                return loaded[1]
            value = self._load(rec)
            self._loaded = (rec.sha256, value)
            return value

    def path(self) -> Any:
        """The verified local path of the artifact's file."""
        return self._verified_path(self.record())

    def _verified_path(self, rec: Record) -> Any:
        try:
            path = storage.verify(rec.as_artifact())
        except ArtifactCorrupt as exc:
            active.corrupt[rec.sha256] = str(exc)
            logger.error("%s", exc)
            raise
        active.corrupt.pop(rec.sha256, None)
        return path

    def _load(self, rec: Record) -> Any:
        started = time.monotonic()
        path = self._verified_path(rec)
        value = formats.read(path, rec.format)
        logger.info(
            "loaded artifact %s (%s, %d bytes) in %.3f s",
            rec.name,
            rec.format,
            rec.size,
            time.monotonic() - started,
        )
        return value


_handles: dict[str, ArtifactHandle] = {}
_handles_lock = threading.Lock()


def artifact(name: str) -> ArtifactHandle:
    """The process-wide handle on artifact ``name`` (no I/O until ``.get()``)."""
    handle = _handles.get(name)
    if handle is None:
        with _handles_lock:
            handle = _handles.setdefault(name, ArtifactHandle(name))
    return handle
