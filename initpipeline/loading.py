"""Artifact handles, how one artifact is loaded, and this process's look at the active generation.

A handle (``artifact("lsa", loader=..., warmup=...)``) declares what a process serves. In a
web process that serves in the background (serving.py), ``get()`` only ever hands out what
the background thread loaded; anywhere else (a shell, a command, a test) it loads on first
use, as a script expects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from django.db import DatabaseError

from . import formats, storage
from .conf import settings
from .exceptions import ArtifactCorrupt, ArtifactLoadError, ArtifactNotReady, PipelineConfigError
from .registry import valid_name

logger = logging.getLogger("initpipeline")


@dataclass(frozen=True)
class Record:
    """What a web process needs to know of one active artifact."""

    name: str
    pk: int
    storage_key: str
    digest: str
    size: int
    format: str

    def as_artifact(self) -> Any:
        """An unsaved Artifact with these fields, for storage.verify() and problem()."""
        from .models import Artifact

        return Artifact(
            pk=self.pk,
            name=self.name,
            storage_key=self.storage_key,
            digest=self.digest,
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
        # digest -> reason, for files this process found corrupt (reported by /init/readyz).
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

    def peek(self) -> Snapshot:
        """The snapshot as last looked at, with no query (what the loader thread saw)."""
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
        from .models import Generation

        try:
            gen_id = Generation.objects.filter(is_active=True).values_list("pk", flat=True).first()
            if gen_id is None:
                return Snapshot(None, {})
            if gen_id == self._snapshot.generation_id:
                return self._snapshot
            return snapshot_of(gen_id)
        except DatabaseError as exc:
            # Keep serving what we had: a database hiccup must not take loaded
            # artifacts away from a site that already works.
            logger.warning("cannot read the active generation: %s", exc)
            if self._snapshot.generation_id is None:
                raise ArtifactNotReady(f"cannot read the active generation: {exc}") from exc
            return self._snapshot


active = ActiveGeneration()


def snapshot_of(generation_id: int) -> Snapshot:
    """The records of one generation (active or not): one query."""
    from .models import Artifact

    rows = Artifact.objects.filter(generations=generation_id).values_list(
        "name", "pk", "storage_key", "digest", "size", "format"
    )
    return Snapshot(generation_id, {r[0]: Record(*r) for r in rows})


#: The swap policies of a handle. The first two are named after TF Serving's:
#: "load-first" keeps serving the old object until the new one is loaded and warmed in
#: the same process (availability; two copies for a while); "free-first" drops the old
#: one first (resources; that artifact answers "warming up" while the new one loads).
#: "new-worker": each worker of the Gunicorn server in turn makes way for a new one, which
#: loads the new generation before it takes a connection (availability and resources: no
#: request shares a process, or its GIL, with a load, and no worker holds two copies;
#: the server has one worker fewer while each loads). Where there is no Gunicorn server of
#: two workers or more, it acts as "load-first".
LOAD_FIRST = "load-first"
FREE_FIRST = "free-first"
NEW_WORKER = "new-worker"
SWAP_POLICIES = (LOAD_FIRST, FREE_FIRST, NEW_WORKER)


@dataclass(frozen=True)
class Loaded:
    """One artifact as this process serves it: loaded (and warmed), or, for an artifact
    no handle loads (``value`` is None, ``path`` set), verified on this host."""

    record: Record
    generation_id: int | None
    path: Path
    value: Any
    #: False for an artifact only verified (a required artifact with no handle).
    has_value: bool
    #: Seconds the verify, the load and the warm-up took.
    seconds: float
    #: When it was loaded (time.time()).
    at: float

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def digest(self) -> str:
        return self.record.digest


class Serving(Protocol):
    """What a handle asks of the process's background loader (serving.Repository)."""

    def lookup(self, name: str) -> Loaded | None: ...

    def wake(self) -> None: ...


#: The process's background loader, once serving.start() ran in this process; None in a
#: shell, a command, a Celery worker or a test.
serving: Serving | None = None


def in_background() -> Serving | None:
    """The background loader when this process serves in the background, else None."""
    return serving


class ArtifactHandle:
    """A handle on one artifact of the active generation: what a process serves.

    ``artifact("lsa")`` does no I/O. In a web process that serves in the background
    (Gunicorn with ``initpipeline.gunicorn_conf``, or ``serving.start()``), a thread loads
    every declared handle as soon as the process starts and whenever a newer generation
    carries other bytes, and ``get()`` returns what it loaded: it never waits for a load,
    and raises ``ArtifactNotReady`` while nothing is loaded yet (``requires_artifacts``
    answers "warming up" then). Elsewhere (a shell, a command, a test), ``get()`` loads on
    first use and caches the object per content.

    A request keeps the objects it got: a generation switch never changes an object under
    a running request, and every handle of one request serves the same generation.
    """

    def __init__(
        self,
        name: str,
        loader: Callable[[Path], Any] | None = None,
        warmup: Callable[[Any], Any] | None = None,
        swap: str = LOAD_FIRST,
    ) -> None:
        self.name = name
        self.loader = loader
        self.warmup = warmup
        self.swap = swap
        #: Which options were given (the others are defaults a later declaration may set).
        self.declared: dict[str, Any] = {}
        self._loaded: Loaded | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"artifact({self.name!r})"

    def record(self, snapshot: Snapshot | None = None) -> Record:
        """This artifact's record in ``snapshot`` (default: the active one)."""
        rec = (active.snapshot() if snapshot is None else snapshot).records.get(self.name)
        if rec is None:
            raise ArtifactNotReady(f"artifact {self.name!r} is not active yet")
        return rec

    def _served(self) -> Loaded | None:
        """What the background loader serves (None: not loaded yet); only when serving."""
        assert serving is not None
        loaded = serving.lookup(self.name)
        if loaded is None or not loaded.has_value:
            serving.wake()  # A handle declared after the start: load it soon.
            return None
        return loaded

    def ready(self) -> bool:
        """True when ``get()`` would return at once, with no load: in a process that serves
        in the background, when this artifact is loaded; elsewhere, when the active
        generation has it (no file I/O; while it is missing, the database is looked at
        again every ``not_ready_interval()``)."""
        if serving is not None:
            return self._served() is not None
        try:
            return self.name in active.snapshot().records or self.name in active.recent().records
        except ArtifactNotReady:
            return False

    def get(self) -> Any:
        """The loaded artifact (see the class's docstring); raises ``ArtifactNotReady``
        while there is none, ``ArtifactCorrupt`` for a file that fails its check and
        ``ArtifactLoadError`` when the loader or the warm-up raised (outside a serving
        process: there the background loader logs it and keeps the previous object)."""
        return self.loaded().value

    def loaded(self) -> Loaded:
        """``get()``'s object with its generation, path and load time."""
        if serving is not None:
            found = self._served()
            if found is None:
                raise ArtifactNotReady(f"artifact {self.name!r} is not loaded in this process yet")
            return found
        # One snapshot for the record and the generation: a refresh between two reads
        # would stamp one generation's object with the other's number.
        snapshot = active.snapshot()
        rec = self.record(snapshot)
        generation = snapshot.generation_id
        cached = self._loaded
        if cached is not None and cached.digest == rec.digest:
            if cached.generation_id != generation:
                # The same bytes in a newer generation: the object serves it, unloaded.
                cached = self._loaded = replace(cached, generation_id=generation)
            return cached
        with self._lock:
            cached = self._loaded
            if cached is not None and cached.digest == rec.digest:
                return cached
            loaded = load(self, rec, generation)
            self._loaded = loaded
            return loaded

    @property
    def generation(self) -> int | None:
        """The generation whose object ``get()`` returns (in a request: the one it serves)."""
        return self.loaded().generation_id

    def path(self) -> Path:
        """The verified local path of the artifact's file (a directory for ``save_dir``):
        in a serving process, the file of the generation ``get()`` serves."""
        if serving is not None:
            found = serving.lookup(self.name)
            if found is None:
                serving.wake()
                raise ArtifactNotReady(f"artifact {self.name!r} is not loaded in this process yet")
            return found.path
        return verified_path(self.record())


def verified_path(rec: Record) -> Path:
    """The record's local path, verified (once per host); a corrupt file is remembered."""
    try:
        path = storage.materialize(rec.as_artifact())
    except ArtifactCorrupt as exc:
        active.corrupt[rec.digest] = str(exc)
        logger.error("%s", exc)
        raise
    active.corrupt.pop(rec.digest, None)
    return Path(path)


def load(handle: ArtifactHandle | None, rec: Record, generation_id: int | None) -> Loaded:
    """Verify, load and warm up one artifact; ``handle`` None: verify only.

    The handle's loader gets the verified local path (a directory for a directory
    artifact); without one, the built-in format's reader loads it. An exception of the
    loader or of the warm-up becomes ``ArtifactLoadError`` (its cause attached);
    ``ArtifactCorrupt`` and ``ArtifactNotReady`` pass as they are.
    """
    started = time.monotonic()
    path = verified_path(rec)
    value: Any = None
    if handle is not None:
        step = "loader"
        try:
            if handle.loader is not None:
                value = handle.loader(path)
            else:
                value = formats.read(path, rec.format)
            if handle.warmup is not None:
                step = "warm-up"
                handle.warmup(value)
        except (ArtifactNotReady, ArtifactCorrupt):
            raise
        except Exception as exc:
            raise ArtifactLoadError(
                f"the {step} of artifact {rec.name!r} raised {type(exc).__name__}: {exc}"
            ) from exc
    seconds = time.monotonic() - started
    if handle is not None:
        logger.info(
            "loaded artifact %s (%s, %d bytes) in %.3f s", rec.name, rec.format, rec.size, seconds
        )
    return Loaded(
        record=rec,
        generation_id=generation_id,
        path=path,
        value=value,
        has_value=handle is not None,
        seconds=seconds,
        at=time.time(),
    )


_handles: dict[str, ArtifactHandle] = {}
_handles_lock = threading.Lock()


def _same(a: Any, b: Any) -> bool:
    """Whether two options name the same thing: the same object, or (a module imported
    twice, a class's method taken again) the same function by module and name."""
    if a is b or a == b:
        return True
    name_a = (getattr(a, "__module__", None), getattr(a, "__qualname__", None))
    name_b = (getattr(b, "__module__", None), getattr(b, "__qualname__", None))
    return None not in name_a and name_a == name_b and "<lambda>" not in str(name_a[1])


def artifact(
    name: str,
    *,
    loader: Callable[[Path], Any] | None = None,
    warmup: Callable[[Any], Any] | None = None,
    swap: str | None = None,
) -> ArtifactHandle:
    """The process-wide handle on artifact ``name`` (no I/O here).

    ``loader(path) -> object`` loads the artifact from its verified local path (a
    directory for a directory artifact): ``faiss.read_index``, ``joblib.load``,
    ``spacy.load``...; without one, the built-in format's reader does (JSON, bytes, a
    memory-mapped array, a signed pickle, a path). ``warmup(obj)`` runs once after each
    load, before any request gets the object (a dummy query, a JIT compile). ``swap``:
    ``"load-first"`` (default) or ``"free-first"`` (see ``SWAP_POLICIES``).

    Declaring one name twice gives the same handle; declaring it twice with a different
    loader, warm-up or swap policy raises ``PipelineConfigError`` (two copies of a model
    would be loaded otherwise). A bare ``artifact(name)`` takes what another declaration
    of that name set.
    """
    if not isinstance(name, str) or not valid_name(name):
        raise PipelineConfigError(f"artifact({name!r}): not a valid artifact name")
    given: dict[str, Any] = {}
    for option, value in (("loader", loader), ("warmup", warmup)):
        if value is not None:
            if not callable(value):
                raise PipelineConfigError(
                    f"artifact({name!r}, {option}=...) must be a function, not {value!r}"
                )
            given[option] = value
    if swap is not None:
        if swap not in SWAP_POLICIES:
            raise PipelineConfigError(
                f"artifact({name!r}, swap={swap!r}): swap must be one of "
                f"{', '.join(map(repr, SWAP_POLICIES))}"
            )
        given["swap"] = swap
    handle = _handles.get(name)
    if handle is not None and not given:
        return handle
    with _handles_lock:
        handle = _handles.setdefault(name, ArtifactHandle(name))
        for option, value in given.items():
            if option in handle.declared and not _same(handle.declared[option], value):
                raise PipelineConfigError(
                    f"artifact({name!r}) is declared twice with different {option}s: "
                    f"{handle.declared[option]!r} and {value!r}; declare it once (in one "
                    "module) and import that handle where else it is needed"
                )
        for option, value in given.items():
            handle.declared[option] = value
            setattr(handle, option, value)
            # A different way to load it: what was loaded the old way is not this.
            handle._loaded = None
    return handle


def declared() -> Mapping[str, ArtifactHandle]:
    """Every handle this process has declared, by artifact name."""
    return dict(_handles)
