"""PhaseContext: what a phase function receives."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from . import formats, storage
from .exceptions import PhaseCancelled, PipelineConfigError

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
            message=message[:500],
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
                message=message[:200],
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

    def _publish(self, name: str, path: Path, fmt: str, metadata: dict[str, Any] | None) -> None:
        suffix = formats.SUFFIX[fmt]
        published = storage.publish(path, name=name, suffix=suffix)
        self._published[name] = (published, fmt, dict(metadata or {}))
        self.logger.info(
            "published %s (%s, %d bytes, sha256 %s)", name, fmt, published.size, published.sha256
        )

    def save_json(self, name: str, value: Any, *, metadata: dict[str, Any] | None = None) -> None:
        """Publish ``value`` as JSON."""
        self._reserve(name)
        path = storage.new_scratch_path(".json")
        formats.write_json(path, value)
        self._publish(name, path, "json", metadata)

    def save_bytes(self, name: str, data: bytes, *, metadata: dict[str, Any] | None = None) -> None:
        """Publish raw bytes."""
        self._reserve(name)
        path = storage.new_scratch_path(".bin")
        formats.write_bytes(path, data)
        self._publish(name, path, "bytes", metadata)

    def save_array(self, name: str, array: Any, *, metadata: dict[str, Any] | None = None) -> None:
        """Publish a numpy array as ``.npy``; readers memory-map it read-only."""
        self._reserve(name)
        path = storage.new_scratch_path(".npy")
        formats.write_npy(path, array)
        meta = {"shape": list(getattr(array, "shape", ())), "dtype": str(array.dtype)}
        meta.update(metadata or {})
        self._publish(name, path, "npy", meta)

    def save_pickle(self, name: str, value: Any, *, metadata: dict[str, Any] | None = None) -> None:
        """Publish a pickle signed with an HMAC of SECRET_KEY; unsigned ones never load."""
        self._reserve(name)
        path = storage.new_scratch_path(".pkl")
        formats.write_pickle(path, value)
        self._publish(name, path, "pickle", metadata)

    def save_file(
        self, name: str, source: str | Path, *, metadata: dict[str, Any] | None = None
    ) -> None:
        """Publish a file the phase wrote (moved if from ``scratch_path()``, else copied)."""
        self._reserve(name)
        source = Path(source)
        path = storage.new_scratch_path(source.suffix)
        if source.parent == path.parent:
            source.rename(path)  # Written with scratch_path(): move, don't copy.
        else:
            shutil.copyfile(source, path)
        storage.fsync_file(path)
        meta = {"filename": source.name}
        meta.update(metadata or {})
        self._publish(name, path, "file", meta)

    def scratch_path(self, suffix: str = "") -> Path:
        """A fresh path to write a file to before ``save_file``."""
        return storage.new_scratch_path(suffix)

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
