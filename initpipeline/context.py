"""PhaseContext: what a phase function receives."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from django.utils import timezone

from . import checkpoints, events, formats, storage
from .conf import settings
from .exceptions import PhaseCancelled, PhaseHandedOff, PipelineConfigError
from .formatters import plain_text, storable
from .shards import Shard, part_name

if TYPE_CHECKING:
    from .models import PhaseRun
    from .registry import Phase, Pipeline


class PhaseContext:
    """Handed to every phase function.

    A phase reports with ``progress()``, writes its artifacts with the ``save_*`` methods
    (each name it declared in ``produces=`` exactly once) and reads upstream artifacts with
    ``load()``. Nothing is visible to readers until the phase succeeds: the artifacts of a
    phase that raises are never recorded. ``progress()`` and ``heartbeat()`` raise
    ``PhaseCancelled`` once the run is cancelled (or, after this copy's heartbeat went
    stale, another copy took the phase over); let it propagate.

    A long phase checkpoints: ``checkpoint(state)`` stores a state it can resume from, and
    the next attempt (after a lost worker, a worker's shutdown, a failure with retries, or
    in the next run of the same fingerprint) finds it as ``resumed`` (None on a fresh
    start)::

        state = ctx.resumed or {"done": 0, "parts": []}
        for i in range(state["done"], len(items)):
            state["parts"].append(work(items[i]))
            state["done"] = i + 1
            if state["done"] % step == 0:
                ctx.checkpoint(state)
            ctx.progress(i + 1, len(items), checkpoint=lambda: state)

    When the worker is shutting down, ``progress()`` and ``heartbeat()`` save the state
    their ``checkpoint=`` callable returns (if given) and raise ``PhaseHandedOff``: let it
    propagate, and the phase continues on another worker from that checkpoint.
    """

    def __init__(self, *, phase: Phase, phase_run: PhaseRun, pipeline: Pipeline) -> None:
        self.phase = phase
        self.name = phase.name
        #: Which shard this task is of a sharded phase (``ctx.shard.index``, ``.count``);
        #: None for a phase that is not sharded, and in its merge.
        self.shard: Shard | None = None
        if phase_run.shard_of and phase_run.shard_index is not None and phase_run.shard_count:
            self.shard = Shard(phase_run.shard_index, phase_run.shard_count)
        self.run_id: int = phase_run.run_id
        self.attempt: int = phase_run.attempt
        #: The Celery worker running this copy (its node name, as on the phase's record).
        self.worker: str = phase_run.worker
        self.config: dict[str, Any] = phase.resolved_config()
        self.logger = logging.getLogger(f"initpipeline.phases.{phase.name}")
        self._phase_run_id: int = phase_run.pk
        self._lease: int = phase_run.lease
        self._pipeline = pipeline
        self._published: dict[str, tuple[storage.Published, str, dict[str, Any]]] = {}
        self._last_write = 0.0
        self._lock = threading.Lock()
        self._checkpoint: dict[str, Any] | None = phase_run.checkpoint
        self._resumed_from = phase_run.checkpoint
        self._done: float | None = None
        self._total: float | None = None
        self.cancelled = threading.Event()
        self.handoff = threading.Event()
        #: cause -> [seconds, times]: this phase's time spent in initpipeline (costs()).
        self._costs: dict[str, list[float]] = {}

    @contextmanager
    def _cost(self, cause: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = self._costs.setdefault(cause, [0.0, 0])
            spent[0] += time.perf_counter() - started
            spent[1] += 1

    def costs(self) -> dict[str, tuple[float, int]]:
        """Seconds this phase spent in initpipeline, and how many times, by cause:
        ``publish`` (hash, fsync, rename), ``checkpoints``, ``progress`` (the throttled
        writes and events), ``heartbeats`` (the phase's own calls), ``loads`` (the lookup
        and the check of upstream artifacts; reading them is the phase's)."""
        return {cause: (spent[0], int(spent[1])) for cause, spent in self._costs.items()}

    # -- resuming -------------------------------------------------------------------------

    @functools.cached_property
    def resumed(self) -> Any:
        """The state of the checkpoint this attempt resumes from; None on a fresh start."""
        if self._resumed_from is None:
            return None
        return checkpoints.load(self._resumed_from)

    @property
    def resumed_progress(self) -> tuple[float, float | None] | None:
        """(done, total) when the checkpoint this attempt resumes from was saved."""
        point = self._resumed_from
        if point is None or point.get("done") is None:
            return None
        return float(point["done"]), point.get("total")

    @property
    def stopping(self) -> bool:
        """True once the worker asked for the phase back (it is shutting down)."""
        return self.handoff.is_set()

    def checkpoint(
        self, state: Any, *, done: float | None = None, total: float | None = None
    ) -> None:
        """Store ``state`` durably: the next attempt of this phase resumes from it.

        JSON when JSON gives it back equal, else a pickle signed like ``save_pickle``;
        tens of MB are fine (it is written like an artifact). ``done``/``total`` default
        to the last progress reported, and the progress bar resumes from there.
        """
        self._raise_if_cancelled()
        with self._cost("checkpoints"):
            record = checkpoints.save(
                state,
                run_id=self.run_id,
                phase_run_id=self._phase_run_id,
                done=self._done if done is None else done,
                total=self._total if total is None else total,
            )
            owned = self._row().update(checkpoint=record, heartbeat_at=timezone.now())
            previous, self._checkpoint = self._checkpoint, record
            if not owned:
                checkpoints.discard(record, previous=None)
                self._raise_unless(owned)
            checkpoints.discard(previous, previous=record)
        self.logger.info(
            "checkpoint saved (%s, %d bytes) at %s of %s",
            record["format"],
            record["size"],
            record["done"],
            record["total"],
        )

    # -- progress -------------------------------------------------------------------------

    def progress(
        self,
        done: float,
        total: float | None = None,
        message: str = "",
        *,
        checkpoint: Callable[[], Any] | None = None,
    ) -> None:
        """Report ``done`` out of ``total`` units of work, with a short message.

        ``checkpoint``: a callable returning the state to save if the worker asks for the
        phase back (see the class docstring).
        """
        self._raise_if_cancelled()
        self._done, self._total = done, total
        if self.handoff.is_set():
            self._hand_off(checkpoint)
        now = time.monotonic()
        finished = total is not None and done >= total
        if not finished and now - self._last_write < settings.PROGRESS_INTERVAL:
            return
        self._last_write = now
        with self._cost("progress"):
            written = (
                self._row()
                .filter(handoff_requested_at__isnull=True)
                .update(
                    progress_done=done,
                    progress_total=total,
                    message=storable(plain_text(message))[:500],
                    heartbeat_at=timezone.now(),
                )
            )
            if written:
                self._send_event(done, total, message)
        if not written:
            self._notice_handoff(checkpoint)

    def _send_event(self, done: float, total: float | None, message: str) -> None:
        # A task event reaches Flower and `celery events` (workers need -E); update_state()
        # would only write to a result backend, which no monitor watches (FIELD_NOTES).
        from celery import current_task

        task = current_task
        # A proxy: "is None" is never true of it, but it is false outside a task (a phase
        # run in-process, by a test or a command), where there is no event to send.
        if not task or not task.request.id:
            return
        events.send(
            task.app,
            hostname=task.request.hostname,
            uuid=task.request.id,
            phase=self.name,
            shard=None if self.shard is None else self.shard.index,
            run_id=self.run_id,
            done=done,
            total=total,
            message=storable(plain_text(message))[:200],
        )

    def heartbeat(self, *, checkpoint: Callable[[], Any] | None = None) -> None:
        """Say the phase is alive (a background thread also does it every HEARTBEAT_INTERVAL).

        ``checkpoint``: as for ``progress()``.
        """
        self._raise_if_cancelled()
        if self.handoff.is_set():
            self._hand_off(checkpoint)
        with self._cost("heartbeats"):
            beat = self._row().filter(handoff_requested_at__isnull=True)
            alive = beat.update(heartbeat_at=timezone.now())
        if not alive:
            self._notice_handoff(checkpoint)

    def _notice_handoff(self, checkpoint: Callable[[], Any] | None) -> None:
        """A guarded write matched nothing: the worker wants the phase back, or it is lost."""
        self._raise_unless(self._row().update(heartbeat_at=timezone.now()))
        self.handoff.set()
        self._hand_off(checkpoint)

    def _hand_off(self, checkpoint: Callable[[], Any] | None) -> None:
        if checkpoint is not None:
            try:
                self.checkpoint(checkpoint())
            except PhaseCancelled:
                raise
            except Exception:
                # Handing off without a fresh checkpoint costs work, not correctness.
                self.logger.exception("the checkpoint at hand-off failed")
        raise PhaseHandedOff(f"phase {self.name}: its worker is shutting down; handing it back")

    def _row(self) -> Any:
        # Only the copy that owns the running row writes to it: once the run is cancelled
        # or a stale phase is taken over, this copy's writes go nowhere (execution.claim).
        from .models import PhaseRun

        return PhaseRun.objects.owned(self._phase_run_id, self._lease)

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
        return storage.new_scratch_path(suffix, run_id=self.run_id, phase_run_id=self._phase_run_id)

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

    def _record_name(self, name: str) -> str:
        """What artifact ``name`` is recorded as: a shard saves its part of it."""
        if self.shard is None:
            return name
        return part_name(name, self.shard.index, self.shard.count)

    def _publish(
        self,
        name: str,
        path: Path,
        fmt: str,
        metadata: dict[str, Any] | None,
        *,
        copy_from: Path | None = None,
    ) -> None:
        recorded = self._record_name(name)
        with self._cost("publish"):
            published = storage.publish(
                path, name=recorded, suffix=formats.SUFFIX[fmt], copy_from=copy_from
            )
        self._published[name] = (published, fmt, dict(metadata or {}))
        self.logger.info(
            "published %s (%s, %d bytes, %s)",
            recorded,
            fmt,
            published.size,
            published.digest,
        )

    def save_prepared(
        self,
        name: str,
        fmt: str,
        write: Callable[[Path], None],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Publish artifact ``name`` in format ``fmt`` from a file that ``write(path)`` writes
        (for merge functions that write large outputs piece by piece)."""
        if fmt not in formats.SUFFIX:
            raise PipelineConfigError(f"unknown artifact format {fmt!r}")
        self._save(name, fmt, write, metadata)

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
        """Publish a file the phase wrote: moved if from ``scratch_path()``, else copied
        (by the kernel, while a thread hashes it). Never the whole file in memory."""
        source = Path(source)
        meta = {"filename": source.name, **(metadata or {})}
        self._reserve(name)
        path = self._scratch("")
        if source.parent == path.parent:
            source.rename(path)  # Written with scratch_path(): move, don't copy.
            self._publish(name, path, "file", meta)
        else:
            self._publish(name, path, "file", meta, copy_from=source)

    def save_dir(
        self, name: str, source: str | Path, *, metadata: dict[str, Any] | None = None
    ) -> None:
        """Publish a folder (a ``save_pretrained`` model, a spaCy pipeline, an index made of
        several files) as one artifact, verified as a whole. Readers get it as a local
        folder, read-only, on every host: ``ctx.load()`` and a handle's ``path()`` return
        its path, and a handle's ``loader`` receives it (``artifact("model",
        loader=spacy.load)``). Regular files and folders only; the folder is left as it is.
        """
        source = Path(source)
        files = sum(1 for p in source.rglob("*") if p.is_file()) if source.is_dir() else 0
        meta = {"files": files, **(metadata or {})}
        self._save(name, "dir", lambda path: formats.write_dir(path, source), meta)

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
        Publishing hashes the file while it syncs it to disk (storage.hash_and_sync).
        """
        self._reserve(name)
        path = self._scratch("")
        try:
            with open(path, "wb") as fh:
                yield fh
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
        with self._cost("loads"):
            upstream = PhaseRun.objects.get(run_id=self.run_id, name=producer)
            record = Artifact.objects.for_fingerprint(name, upstream.fingerprint).first()
            if record is None:
                from .exceptions import ArtifactNotReady

                raise ArtifactNotReady(f"artifact {name!r} of phase {producer!r} is not recorded")
            path = storage.materialize(record)
        return formats.read(path, record.format)

    # -- merging the parts of a sharded phase -------------------------------------------

    def _part_records(self, name: str) -> list[Any]:
        from .models import Artifact, PhaseRun

        if name not in self.phase.produces or self.shard is not None:
            raise PipelineConfigError(
                f"phase {self.name!r}: parts of {name!r} are read in the merge of a sharded "
                "phase that produces it"
            )
        rows = PhaseRun.objects.filter(run_id=self.run_id, shard_of=self.name).order_by(
            "shard_index"
        )
        records = []
        for row in rows:
            part = part_name(name, row.shard_index or 0, row.shard_count or 0)
            record = Artifact.objects.for_fingerprint(part, row.fingerprint).first()
            if record is None:
                from .exceptions import ArtifactNotReady

                raise ArtifactNotReady(
                    f"shard {row.shard_index} of {self.name!r} saved no {name!r}"
                )
            records.append(record)
        return records

    def parts(self, name: str) -> list[Path]:
        """The verified local paths of every shard's part of ``name``, in shard order."""
        return [storage.materialize(record) for record in self._part_records(name)]

    def load_parts(self, name: str) -> list[Any]:
        """Every shard's part of ``name``, loaded, in shard order."""
        return [
            formats.read(storage.materialize(record), record.format)
            for record in self._part_records(name)
        ]

    def part_format(self, name: str) -> str:
        """The format the shards saved their parts of ``name`` in."""
        found = {record.format for record in self._part_records(name)}
        if len(found) != 1:
            raise PipelineConfigError(
                f"phase {self.name!r}: the shards saved {name!r} in several formats: "
                f"{', '.join(sorted(found))}"
            )
        return str(found.pop())

    # -- used by execution ----------------------------------------------------------------

    def published(self) -> dict[str, tuple[storage.Published, str, dict[str, Any]]]:
        """What the phase published, by the artifact names of its record."""
        missing = [n for n in self.phase.produces if n not in self._published]
        if missing:
            raise PipelineConfigError(
                f"phase {self.name!r} returned without saving {', '.join(missing)}"
            )
        return {self._record_name(n): value for n, value in self._published.items()}
