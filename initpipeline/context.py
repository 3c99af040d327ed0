"""PhaseContext: what a phase function receives."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from django.utils import timezone

from . import formats, storage
from .exceptions import PhaseCancelled, PipelineConfigError
from .formatters import plain_text

if TYPE_CHECKING:
    from .models import PhaseRun
    from .registry import Phase, Pipeline

# Progress is written at most this often (seconds), and always at 100 %.
PROGRESS_WRITE_INTERVAL = 0.5


class PhaseContext:
    """Handed to every phase function.

    A phase reports with ``progress()``, writes its artifacts with the ``save_*`` methods
    (each name it declared in ``produces=`` exactly once) and reads upstream artifacts with
    ``load()``. Nothing is visible to readers until the phase succeeds: the artifacts of a
    phase that raises are never recorded. ``progress()`` and ``heartbeat()`` raise
    ``PhaseCancelled`` once the run is cancelled (or, after this copy's heartbeat went
    stale, another copy took the phase over); let it propagate.
    """

    def __init__(self, *, phase: Phase, phase_run: PhaseRun, pipeline: Pipeline) -> None:
        self.phase = phase
        self.name = phase.name
        self.run_id: int = phase_run.run_id
        self.attempt: int = phase_run.attempt
        self.config: dict[str, Any] = phase.resolved_config()
        self.logger = logging.getLogger(f"initpipeline.phases.{phase.name}")
        self._phase_run_id: int = phase_run.pk
        self._pipeline = pipeline
        self._published: dict[str, tuple[storage.Published, str, dict[str, Any]]] = {}
        self._last_write = 0.0
        self._lock = threading.Lock()
        self.cancelled = threading.Event()

    # -- progress -------------------------------------------------------------------------

    def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Report ``done`` out of ``total`` units of work, with a short message."""
        self._raise_if_cancelled()
        now = time.monotonic()
        finished = total is not None and done >= total
        if not finished and now - self._last_write < PROGRESS_WRITE_INTERVAL:
            return
        self._last_write = now
        owned = self._row().update(
            progress_done=done,
            progress_total=total,
            message=plain_text(message)[:500],
            heartbeat_at=timezone.now(),
        )
        self._raise_unless(owned)
        self._send_event(done, total, message)

    def _send_event(self, done: float, total: float | None, message: str) -> None:
        # A task event reaches Flower and `celery events` (workers need -E); update_state()
        # would only write to a result backend, which no monitor watches (FIELD_NOTES).
        from celery import current_task

        task = current_task
        if task is None or not task.request.id:
            return
        try:
            # retry=False: with the broker down, progress() must not block the phase
            # for the publish retry policy's seconds; an event is worth losing.
            task.send_event(
                "task-progress",
                retry=False,
                phase=self.name,
                run_id=self.run_id,
                done=done,
                total=total,
                message=plain_text(message)[:200],
            )
        except Exception:
            self.logger.debug("could not send the task-progress event", exc_info=True)

    def heartbeat(self) -> None:
        """Say the phase is alive (a background thread also does it every HEARTBEAT_INTERVAL)."""
        self._raise_if_cancelled()
        self._raise_unless(self._row().update(heartbeat_at=timezone.now()))

    def _row(self) -> Any:
        # Only the attempt that owns the running row writes to it: once the run is cancelled
        # or a stale phase is taken over, this copy's writes go nowhere (execution.claim).
        from .models import PhaseRun

        return PhaseRun.objects.owned(self._phase_run_id, self.attempt)

    def _raise_unless(self, owned: int) -> None:
        if not owned:
            self.cancelled.set()
            raise PhaseCancelled(f"run {self.run_id} was cancelled, or this copy lost the phase")

    def _raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise PhaseCancelled(f"run {self.run_id} was cancelled")

    # -- writing --------------------------------------------------------------------------

    def _reserve(self, name: str) -> None:
        if name not in self.phase.produces:
            raise PipelineConfigError(
                f"phase {self.name!r} saved artifact {name!r}, which it does not declare in "
                f"produces= ({', '.join(self.phase.produces)})"
            )
        if name in self._published:
            raise PipelineConfigError(f"phase {self.name!r} saved artifact {name!r} twice")

    def _scratch(self, suffix: str) -> Path:
        return storage.new_scratch_path(suffix, run_id=self.run_id)

    def _save(
        self,
        name: str,
        fmt: str,
        write: Callable[[Path], None],
        metadata: dict[str, Any] | None,
    ) -> None:
        """Write the artifact to a scratch file, then publish it; a failed write leaves
        no partial file behind (disk full, file size limit)."""
        self._reserve(name)
        path = self._scratch(formats.SUFFIX[fmt])
        try:
            write(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._publish(name, path, fmt, metadata)

    def _publish(self, name: str, path: Path, fmt: str, metadata: dict[str, Any] | None) -> None:
        published = storage.publish(path, name=name, suffix=formats.SUFFIX[fmt])
        self._published[name] = (published, fmt, dict(metadata or {}))
        self.logger.info(
            "published %s (%s, %d bytes, sha256 %s)", name, fmt, published.size, published.sha256
        )

    def save_json(self, name: str, value: Any, *, metadata: dict[str, Any] | None = None) -> None:
        """Publish ``value`` as JSON."""
        self._save(name, "json", lambda path: formats.write_json(path, value), metadata)

    def save_bytes(self, name: str, data: bytes, *, metadata: dict[str, Any] | None = None) -> None:
        """Publish raw bytes."""
        self._save(name, "bytes", lambda path: formats.write_bytes(path, data), metadata)

    def save_array(self, name: str, array: Any, *, metadata: dict[str, Any] | None = None) -> None:
        """Publish a numpy array as ``.npy``; readers memory-map it read-only."""
        meta = {"shape": list(getattr(array, "shape", ())), "dtype": str(array.dtype)}
        meta.update(metadata or {})
        self._save(name, "npy", lambda path: formats.write_npy(path, array), meta)

    def save_pickle(self, name: str, value: Any, *, metadata: dict[str, Any] | None = None) -> None:
        """Publish a pickle signed with an HMAC of SECRET_KEY; unsigned ones never load."""
        self._save(name, "pickle", lambda path: formats.write_pickle(path, value), metadata)

    def save_file(
        self, name: str, source: str | Path, *, metadata: dict[str, Any] | None = None
    ) -> None:
        """Publish a file the phase wrote (moved if from ``scratch_path()``, else copied)."""
        source = Path(source)

        def move_or_copy(path: Path) -> None:
            if source.parent == path.parent:
                source.rename(path)  # Written with scratch_path(): move, don't copy.
            else:
                shutil.copyfile(source, path)  # Streams: never the whole file in memory.
            storage.fsync_file(path)

        self._save(name, "file", move_or_copy, {"filename": source.name, **(metadata or {})})

    @contextmanager
    def open_artifact(
        self, name: str, *, metadata: dict[str, Any] | None = None
    ) -> Iterator[BinaryIO]:
        """Write a large artifact as a stream; it is published when the block ends::

            with ctx.open_artifact("index") as fh:
                for part in parts:
                    fh.write(part)

        Readers get it as a file (format "file"). Nothing is kept in memory, and an
        exception inside the block publishes nothing and leaves no partial file.
        """
        self._reserve(name)
        path = self._scratch("")
        try:
            with open(path, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._publish(name, path, "file", metadata)

    def scratch_path(self, suffix: str = "") -> Path:
        """A fresh path to write a file to before ``save_file``."""
        return self._scratch(suffix)

    # -- reading --------------------------------------------------------------------------

    def load(self, name: str) -> Any:
        """Load an upstream artifact of this run, after checking its checksum."""
        from .models import Artifact, PhaseRun

        producer = self._pipeline.producer.get(name)
        if producer is None or producer not in self._pipeline.ancestors(self.name):
            raise PipelineConfigError(
                f"phase {self.name!r} loads {name!r}, which no upstream phase produces; "
                "declare it with inputs=[...] or after=[...]"
            )
        upstream = PhaseRun.objects.get(run_id=self.run_id, name=producer)
        record = Artifact.objects.for_fingerprint(name, upstream.fingerprint).first()
        if record is None:
            from .exceptions import ArtifactNotReady

            raise ArtifactNotReady(f"artifact {name!r} of phase {producer!r} is not recorded")
        path = storage.verify(record)
        return formats.read(path, record.format)

    # -- used by execution ----------------------------------------------------------------

    def published(self) -> dict[str, tuple[storage.Published, str, dict[str, Any]]]:
        missing = [n for n in self.phase.produces if n not in self._published]
        if missing:
            raise PipelineConfigError(
                f"phase {self.name!r} returned without saving {', '.join(missing)}"
            )
        return self._published
