"""Serving: a web process loads what it serves in a background thread, never in a request.

One ``Repository`` per process (the shape of Triton's model repository manager): a thread
that looks at the active generation every ``REFRESH_INTERVAL``, loads (verify, load,
warm-up) every declared handle whose bytes changed, and only then publishes the new set
with one assignment. Requests read the published set; each request keeps the set it
started with, so every handle of one request serves one generation, and a load never
holds a request up. A load that fails keeps the previous objects serving, is logged once
and is tried again with backoff.

Under Gunicorn (``initpipeline.gunicorn_conf``), every worker also records what it serves
in a folder of its server (``servers.py``), so that ``/init/readyz`` on any worker says 200
only once every worker of the server can serve, and in the ``WebProcess`` table, for
``init_status``, the admin and the metrics.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import itertools
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

from django.core.signals import request_finished, request_started
from django.db import close_old_connections

from . import checks, loading
from .conf import settings
from .exceptions import ArtifactCorrupt, ArtifactNotReady, InitPipelineError
from .loading import FREE_FIRST, NEW_WORKER, Loaded, Record
from .registry import required_artifacts
from .servers import REPORT_INTERVAL, ServerFolder

logger = logging.getLogger("initpipeline")


@dataclass(frozen=True)
class Served:
    """What this process serves: never changed, replaced whole."""

    #: The generation every entry was loaded from (None before the first load).
    generation_id: int | None
    loaded: Mapping[str, Loaded]


EMPTY = Served(None, {})


@dataclass
class Failure:
    """A load that failed, and when it is tried again."""

    digest: str
    generation_id: int | None
    error: str
    attempts: int
    next_at: float  # time.monotonic()
    since: float  # time.time() of the first failure of these bytes


@dataclass
class Progress:
    """What the loader does now: for the reports (a snapshot is read without a lock)."""

    #: Name -> when (time.time()) its load started, for the loads of this pass.
    loading: dict[str, float] = field(default_factory=dict)
    #: The generation the loader is moving to (None when it serves the active one).
    target: int | None = None


#: The set a request started with (request_started), or a view decorated with
#: requires_artifacts: every handle of that request serves it.
_pinned: contextvars.ContextVar[Served | None] = contextvars.ContextVar(
    "initpipeline_pinned", default=None
)

#: Seconds the loader waits for the requests still holding a retired object to end
#: before it lets go of its own reference anyway (the last request then frees it).
RETIRE_WAIT = 30.0


class Repository:
    """This process's artifacts: the thread that loads them and the set it serves."""

    def __init__(self, *, heartbeat: Callable[[], Any] | None = None) -> None:
        #: What requests get (replaced whole, by one assignment).
        self.current: Served = EMPTY
        #: Loaded for a generation not yet published (a switch waiting for its last load).
        self._pending: dict[str, Loaded] = {}
        self.failures: dict[str, Failure] = {}
        self.progress = Progress()
        self.pid = os.getpid()
        self.started_at = time.time()
        #: Called around each pass that loads something: keeps Gunicorn's arbiter from
        #: taking a load that holds the GIL for a hung worker (gunicorn.heartbeat_process).
        self._heartbeat = heartbeat
        #: The folder of this worker's Gunicorn server (readiness across its workers).
        self.server_folder: ServerFolder | None = None
        #: Asks Gunicorn for a new worker in place of this one (swap="new-worker").
        self.replace_me: Callable[[], Any] | None = None
        #: Called after each change of what this process serves (servers.py, reports).
        self.listeners: list[Callable[[Repository], None]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged_errors: set[str] = set()
        self._last_change = time.monotonic()
        #: Sets replaced by a newer one, to free once no request holds them.
        self._retiring: list[Served] = []
        #: The generation after whose switch this host's cache was last pruned.
        self._pruned_for: int | None = None

    # -- what requests call ---------------------------------------------------------------

    def lookup(self, name: str) -> Loaded | None:
        served = _pinned.get()
        if served is None:
            served = self.current
        return served.loaded.get(name)

    def missing(self, names: list[str]) -> list[str]:
        """Which of ``names`` a request of this process cannot be served yet."""
        served = _pinned.get()
        if served is None:
            served = self.current
        return [n for n in names if (found := served.loaded.get(n)) is None or not found.has_value]

    def wake(self) -> None:
        """Have the thread look again now (a handle declared after the start)."""
        self._wake.set()

    # -- the thread -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="initpipeline-loader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            # As a request would: a connection the server closed (or older than
            # CONN_MAX_AGE) is replaced, not used again and again.
            close_old_connections()
            try:
                delay = self.tick()
                self._retire_all()
                self._prune_after_switch()
                if time.monotonic() - self._last_change >= REPORT_INTERVAL:
                    self._changed()  # Still here: the reports' "last seen".
            except Exception as exc:
                # A bug, or the database gone at the first look: say it once, go on.
                self._log_once(f"tick:{type(exc).__name__}:{exc}", "the artifact loader failed")
                delay = max(1.0, settings.REFRESH_INTERVAL)
            self._wake.wait(delay)
            self._wake.clear()

    def _prune_after_switch(self) -> None:
        """Once this process serves a generation whole (at its start, after each switch):
        delete what the host's cache holds for files no kept generation uses
        (retention.prune_local), keeping two generations at least, so that a sibling
        worker still serving the previous one keeps its files. Every host of the fleet
        that serves prunes its own cache; workers' hosts prune with init_gc."""
        generation = self.current.generation_id
        if generation is None or generation == self._pruned_for or self._pending:
            return
        if self.progress.target is not None or any(
            f.generation_id == generation for f in self.failures.values()
        ):
            return
        self._pruned_for = generation
        from . import retention

        try:
            retention.prune_local(keep=max(2, int(settings.KEEP_GENERATIONS)))
        except Exception:
            self._log_once("prune", "deleting old files from this host's cache failed")

    def _log_once(self, key: str, message: str, *args: Any, traceback: bool = True) -> None:
        if key in self._logged_errors:
            logger.debug(message, *args, exc_info=traceback)
            return
        self._logged_errors.add(key)
        if traceback:
            logger.exception(message, *args)
        else:
            logger.warning(message, *args)

    # -- one pass -------------------------------------------------------------------------

    def wanted(self) -> dict[str, loading.ArtifactHandle | None]:
        """Every declared handle, and every required artifact no handle loads (verified
        only): name -> handle, or None."""
        wanted: dict[str, loading.ArtifactHandle | None] = dict(loading.declared())
        for name in required_artifacts():
            wanted.setdefault(name, None)
        return wanted

    def tick(self, snapshot: loading.Snapshot | None = None) -> float:
        """Load what the active generation (or ``snapshot``'s) has that this process does
        not serve yet, and publish it; return the seconds until the next look.

        No local variable here holds a published set across a retirement (see _retire):
        a set is freed once nothing but the loader's own list refers to it.
        """
        if snapshot is None:
            try:
                snapshot = loading.active.refresh()
            except ArtifactNotReady as exc:
                self._log_once(f"db:{exc}", "cannot read the active generation: %s", exc)
                return max(1.0, settings.REFRESH_INTERVAL)
        records = snapshot.records
        generation = snapshot.generation_id
        wanted = {n: h for n, h in self.wanted().items() if n in records}
        todo = [n for n, h in wanted.items() if not self._serves(n, h, records[n])]
        if not todo:
            self._pending.clear()
            self.progress = Progress()
            if self.current.generation_id != generation or set(self.current.loaded) - set(wanted):
                self._publish(Served(generation, self._carried(wanted, generation)))
            return settings.REFRESH_INTERVAL
        return self._load(generation, records, wanted, todo)

    def _serves(self, name: str, handle: loading.ArtifactHandle | None, rec: Record) -> bool:
        found = self.current.loaded.get(name)
        return (
            found is not None
            and found.digest == rec.digest
            # Verified only, then a handle was declared: it must be loaded now.
            and (found.has_value or handle is None)
        )

    def _carried(self, names: Iterable[str], generation: int | None) -> dict[str, Loaded]:
        """The entries of the current set among ``names``, as entries of ``generation``."""
        loaded = self.current.loaded
        return {n: replace(loaded[n], generation_id=generation) for n in names if n in loaded}

    def _load(
        self,
        generation: int | None,
        records: Mapping[str, Record],
        wanted: Mapping[str, loading.ArtifactHandle | None],
        todo: list[str],
    ) -> float:
        # Before the first generation, or more of the same one: what loads is published
        # at once, one artifact after the other. A switch publishes the whole new set at
        # once, so a request never mixes two generations.
        adding = self.current.generation_id in (None, generation)
        self.progress = Progress(target=None if adding else generation)
        if not adding and any(
            (handle := wanted[n]) is not None and handle.swap == NEW_WORKER for n in todo
        ):
            waiting = self._make_way(generation, records, todo)
            if waiting is not None:
                return waiting
        self._pending = {
            n: v for n, v in self._pending.items() if n in todo and v.digest == records[n].digest
        }
        freeing = [
            n
            for n in todo
            if n in self.current.loaded
            and (handle := wanted[n]) is not None
            and handle.swap == FREE_FIRST
        ]
        if freeing:
            # Free-first: drop the old object before loading the new one, so that there
            # are never two of it; that artifact answers "warming up" meanwhile.
            kept = {n: v for n, v in self.current.loaded.items() if n not in freeing}
            self._publish(Served(self.current.generation_id, kept))
            del kept
            self._retire_all(collect=True)
        now = time.monotonic()
        due = [
            n
            for n in todo
            if n not in self._pending
            and not (
                (failure := self.failures.get(n)) is not None
                and failure.digest == records[n].digest
                and failure.next_at > now
            )
        ]
        # Required artifacts first: readiness waits for them.
        required = set(required_artifacts())
        due.sort(key=lambda n: (n not in required, n))
        if due:
            with self._loading():
                for name in due:
                    if self._stop.is_set():
                        break
                    loaded = self._load_one(wanted[name], records[name], generation)
                    if loaded is None:
                        continue
                    if adding:
                        self._publish(Served(generation, {**self.current.loaded, name: loaded}))
                    else:
                        self._pending[name] = loaded
                    del loaded
        if not adding and all(n in self._pending for n in todo):
            carried = self._carried([n for n in wanted if n not in todo], generation)
            self._publish(Served(generation, {**carried, **self._pending}))
            self._pending = {}
        elif adding:
            self._pending = {}
        retries = [f.next_at for n, f in self.failures.items() if n in todo]
        if retries:
            return max(0.05, min(settings.REFRESH_INTERVAL, min(retries) - time.monotonic()))
        self.progress = Progress()
        return settings.REFRESH_INTERVAL

    @contextlib.contextmanager
    def _loading(self) -> Iterator[None]:
        """What a pass of loads runs under, so that it stops no request for long:

        - Gunicorn's heartbeat beaten by a child process (a load may hold the GIL);
        - the GIL handed over every millisecond, not every 5: a request thread waits for it
          at each I/O call, and a loader thread rarely lets it go of its own accord;
        - no cyclic garbage collection during the loads (each would walk the millions of
          objects being built, holding the GIL), and then ``gc.freeze()``: what was loaded
          moves out of the collector's reach, so no later collection walks it either
          (Instagram's reason to freeze before fork). Its objects are still freed by
          reference counting when retired.
        """
        heartbeat = self._heartbeat() if self._heartbeat is not None else contextlib.nullcontext()
        interval = sys.getswitchinterval()
        collecting = gc.isenabled()
        with heartbeat:
            sys.setswitchinterval(min(interval, 0.001))
            gc.disable()
            try:
                yield
            finally:
                gc.freeze()
                if collecting:
                    gc.enable()
                sys.setswitchinterval(interval)

    def _make_way(
        self, generation: int | None, records: Mapping[str, Record], todo: list[str]
    ) -> float | None:
        """swap="new-worker": exit when it is this worker's turn, so that a new one loads
        ``generation`` before it takes a connection; the seconds until the next look, or
        None to load in this process after all (no Gunicorn server, or no other worker to
        serve meanwhile)."""
        folder, replace_me = self.server_folder, self.replace_me
        if folder is not None and folder.turn_taken():
            return settings.REFRESH_INTERVAL  # another worker's turn: wait for it
        if folder is None or replace_me is None:
            self._log_alone(generation)
            return None
        if folder.failed_lately(generation, within=settings.RETRY_BACKOFF_MAX):
            # A new worker could not load it, and serves what its siblings do: stay.
            for name in todo:
                if self.failures.get(name, None) is None:
                    self.failures[name] = Failure(
                        digest=records[name].digest,
                        generation_id=generation,
                        error=f"a new worker of this server could not load generation "
                        f"{generation} (see its log); tried again later",
                        attempts=1,
                        next_at=float("inf"),
                        since=time.time(),
                    )
                    self._changed()
            return settings.REFRESH_INTERVAL
        if not folder.claim_turn(self.pid, generation):
            return settings.REFRESH_INTERVAL  # another worker's turn: wait for it
        # Asked with the turn held: a sibling that made way a moment ago has left the
        # folder, but its successor holds the turn until it serves, so "no other worker
        # serves" now means this server has one worker.
        if not folder.serving(pid=self.pid):
            folder.give_turn_back()
            self._log_alone(generation)
            return None
        logger.info(
            "generation %s: this worker (pid %s) makes way for a new one, which loads it "
            "before it takes a connection",
            generation,
            self.pid,
        )
        self._stop.set()
        replace_me()
        return settings.REFRESH_INTERVAL

    def _log_alone(self, generation: int | None) -> None:
        self._log_once(
            "new-worker:alone",
            "swap='new-worker' needs a Gunicorn server of two workers or more: loading "
            "generation %s in this worker instead (as load-first)",
            generation,
            traceback=False,
        )

    def load_before_serving(self) -> None:
        """The first pass of a worker that takes no connection yet while its siblings
        serve (a new worker for a new generation, or one replacing a dead worker): load
        the active generation; if that fails, load what its siblings serve instead, and
        mark the active generation failed for the server."""
        self.tick()
        folder = self.server_folder
        failed = [n for n in self.wanted() if n in self.failures]
        if not failed or folder is None:
            return
        served: Counter[int] = Counter(
            int(w["generation"]) for w in folder.serving(pid=self.pid) if w.get("generation")
        )
        active = loading.active.peek().generation_id
        if not served or active is None:
            return
        fallback = served.most_common(1)[0][0]
        if fallback == active:
            return
        logger.error(
            "generation %s failed to load in this new worker (%s); serving generation %s, as "
            "the other workers of the server do",
            active,
            ", ".join(failed),
            fallback,
        )
        folder.mark_failed(active)
        self._publish(EMPTY)
        self._retire_all(collect=True)
        self.tick(loading.snapshot_of(fallback))

    def _load_one(
        self, handle: loading.ArtifactHandle | None, rec: Record, generation: int | None
    ) -> Loaded | None:
        self.progress.loading[rec.name] = time.time()
        _observe("observe_loading", rec.name, True)
        try:
            loaded = loading.load(handle, rec, generation)
        except Exception as exc:
            self._failed(rec, generation, exc)
            return None
        finally:
            self.progress.loading.pop(rec.name, None)
            _observe("observe_loading", rec.name, False)
        _observe("observe_load", rec.name, loaded.seconds, rec.size)
        old = self.failures.pop(rec.name, None)
        if old is not None:
            logger.info(
                "artifact %s of generation %s loaded after %d failed attempts",
                rec.name,
                generation,
                old.attempts,
            )
        return loaded

    def _failed(self, rec: Record, generation: int | None, exc: Exception) -> None:
        _observe("observe_failure", rec.name)
        old = self.failures.get(rec.name)
        same = old is not None and old.digest == rec.digest
        attempts = old.attempts + 1 if same and old is not None else 1
        # The phases' retry backoff: RETRY_BACKOFF doubling up to RETRY_BACKOFF_MAX, with
        # jitter, so that the workers of a fleet do not try again in step.
        base = min(settings.RETRY_BACKOFF_MAX, settings.RETRY_BACKOFF * 2 ** (attempts - 1))
        delay = base * random.uniform(0.5, 1.0)
        error = (
            f"{type(exc).__name__}: {exc}" if not isinstance(exc, InitPipelineError) else str(exc)
        )
        self.failures[rec.name] = Failure(
            digest=rec.digest,
            generation_id=generation,
            error=error[:2000],
            attempts=attempts,
            next_at=time.monotonic() + delay,
            since=old.since if same and old is not None else time.time(),
        )
        keeps = self.lookup_current(rec.name)
        serving = (
            f"generation {keeps.generation_id} keeps serving"
            if keeps is not None and keeps.has_value
            else "nothing to serve meanwhile"
        )
        if attempts == 1:
            # Logged once, with its traceback; the attempts after it at DEBUG.
            log = logger.error if isinstance(exc, ArtifactCorrupt) else logger.exception
            log(
                "loading artifact %s of generation %s failed (%s); trying again in %.1f s "
                "and then with backoff",
                rec.name,
                generation,
                serving,
                delay,
            )
        else:
            logger.debug(
                "loading artifact %s failed again (attempt %d): %s", rec.name, attempts, error
            )
        self._changed()

    def lookup_current(self, name: str) -> Loaded | None:
        return self.current.loaded.get(name)

    # -- publishing and retiring ----------------------------------------------------------

    def _publish(self, served: Served) -> None:
        old = self.current
        self.current = served  # The swap: one assignment, read without a lock.
        _observe(
            "observe_serving",
            served.generation_id,
            all(n in served.loaded for n in required_artifacts()),
        )
        if served.generation_id != old.generation_id and served.loaded:
            logger.info(
                "serving generation %s (%s)", served.generation_id, ", ".join(sorted(served.loaded))
            )
        kept = {id(v.value) for v in served.loaded.values()}
        if any(v.has_value and id(v.value) not in kept for v in old.loaded.values()):
            self._retiring.append(old)
        del old, served
        self._changed()

    def _retire_all(self, *, collect: bool = False) -> None:
        """Let go of the sets replaced since the last call once no request holds them,
        here, in the loader's thread: freeing a large object takes a while, and no request
        should pay for it. ``collect``: then collect cycles too (free-first: the memory
        must be back before the next load)."""
        deadline = time.monotonic() + RETIRE_WAIT
        while self._retiring:
            box = [self._retiring.pop()]
            # The box's reference and getrefcount's own: any more is a request's (it
            # pinned that set, see _pinned) or a view's local variable.
            while sys.getrefcount(box[0]) > 2 and time.monotonic() < deadline:
                if self._stop.wait(0.01):
                    break
            kept = {id(v.value) for v in self.current.loaded.values()}
            values = [v.value for v in box[0].loaded.values() if id(v.value) not in kept]
            box.clear()
            while values:
                _release(values.pop())
        if collect:
            gc.collect()

    def _changed(self) -> None:
        self._last_change = time.monotonic()
        for listener in list(self.listeners):
            try:
                listener(self)
            except Exception:
                self._log_once(
                    f"listener:{listener!r}", "reporting what this process serves failed"
                )


@functools.cache
def _metrics() -> ModuleType | None:
    """initpipeline.loadmetrics, when prometheus-client (the "metrics" extra) is installed.

    Imported by the loader thread at its first load, never by a request: a worker's first
    answer should not wait for prometheus-client's import.
    """
    try:
        from . import loadmetrics
    except ImportError:
        return None
    return loadmetrics


def _observe(what: str, *args: Any) -> None:
    """Count a load, a failure or a switch in this process's metrics (loadmetrics.py)."""
    found = _metrics()
    if found is None:
        return
    try:
        getattr(found, what)(*args)
    except Exception:
        # A metric is worth losing, a load is not.
        logger.debug("could not update the metrics (%s)", what, exc_info=True)


#: Entries freed between two hand-overs of the GIL when a retired container is released.
RELEASE_CHUNK = 20_000


def _release(value: Any) -> None:
    """Free ``value`` a slice at a time when this is its last reference.

    Freeing a dict of millions of entries is one C call that holds the GIL until the last
    entry is gone (half a second for six million tuples): every request of the process
    would wait for it. Emptying it a slice at a time, with the GIL handed over between
    slices, costs the same in all and stops nobody. Objects of other kinds are freed as
    they are.
    """
    # Ours (the argument, passed as a temporary: _retire_all pops it from its list) and
    # getrefcount's: one more is someone else's, who will free it.
    if sys.getrefcount(value) > 2:
        return
    if isinstance(value, dict):
        while value:
            for key in list(itertools.islice(value, RELEASE_CHUNK)):
                del value[key]
            time.sleep(0)
    elif isinstance(value, list):
        while value:
            del value[-RELEASE_CHUNK:]
            time.sleep(0)
    elif isinstance(value, set):
        while value:
            for item in list(itertools.islice(value, RELEASE_CHUNK)):
                value.discard(item)
            time.sleep(0)


# -- the process's one repository ---------------------------------------------------------

_repository: Repository | None = None
_lock = threading.Lock()


def repository() -> Repository | None:
    """This process's repository once ``start()`` ran in it, else None."""
    return _repository if _repository is not None and _repository.pid == os.getpid() else None


def _pin_request(**kwargs: Any) -> None:
    repo = repository()
    _pinned.set(repo.current if repo is not None else None)


def _unpin_request(**kwargs: Any) -> None:
    _pinned.set(None)


@contextlib.contextmanager
def pinned() -> Iterator[Served | None]:
    """Serve one set for the block: the request's own if it has one, else the current."""
    repo = repository()
    if repo is None or _pinned.get() is not None:
        yield _pinned.get()
        return
    token = _pinned.set(repo.current)
    try:
        yield repo.current
    finally:
        _pinned.reset(token)


def start(
    *,
    heartbeat: Callable[[], Any] | None = None,
    before: Callable[[Repository], Any] | None = None,
) -> Repository:
    """Serve in the background in this process (once; again after a fork).

    Raises ImproperlyConfigured for a bad setting or pipeline (what ``manage.py check``
    reports as an error). Imports the URLconf first, so that the handles its views declare
    exist, then starts the thread. ``before(repository)`` runs before the thread starts
    (the Gunicorn hook loads there when the server's other workers serve, so this one
    takes no request before it can serve). Gunicorn's ``initpipeline.gunicorn_conf``
    calls it in every worker; for another server, call it after the fork (uWSGI:
    ``@postfork``).
    """
    global _repository
    with _lock:
        repo = repository()
        if repo is not None:
            return repo
        # A bad setting would otherwise answer 500 (or 503 for ever) on every request.
        checks.refuse_to_serve()
        _import_views()
        repo = Repository(heartbeat=heartbeat)
        loading.serving = repo
        _repository = repo
        # Each request serves one set, from start to end (see _pinned).
        request_started.connect(_pin_request, dispatch_uid="initpipeline.serving.pin")
        request_finished.connect(_unpin_request, dispatch_uid="initpipeline.serving.unpin")
        if before is not None:
            before(repo)
        repo.start()
        return repo


def stop() -> None:
    """Stop the thread (a worker's exit; tests)."""
    global _repository
    repo = repository()
    if repo is not None:
        repo.stop()
    _repository = None
    loading.serving = None
    request_started.disconnect(dispatch_uid="initpipeline.serving.pin")
    request_finished.disconnect(dispatch_uid="initpipeline.serving.unpin")


def _import_views() -> None:
    """Import the URLconf (and with it the views and the handles they declare), which
    Django would otherwise do at the first request."""
    from django.urls import get_resolver

    try:
        get_resolver().url_patterns  # noqa: B018 - the import is the point
    except Exception:
        # The first request will show the same error; the artifacts still load.
        logger.exception("importing the URLconf to find the artifact handles failed")
