"""What the web processes serve, as others see it: the workers of one Gunicorn server on
this host (for ``/init/readyz``), and every web process of the fleet (``WebProcess`` rows,
for ``init_status``, the admin and the metrics).

A Gunicorn server's workers share one folder, ``LOCAL_CACHE_DIR/servers/<master>/``, named
by the master's process id and start time. Each worker keeps a small JSON file there, named
by its process id: its state and what it serves. A worker that boots writes ``booting``
(it takes no connection yet), then ``serving``; on SIGTERM, ``leaving``. The master's
``child_exit`` hook removes the file of a worker that ended; a file whose process is gone
is ignored (and removed) anyway. ``/init/readyz`` on any worker reads the folder: the
server is ready once every worker that takes connections serves the required artifacts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .processes import alive as _alive
from .processes import process_start
from .storage import cache_dir

if TYPE_CHECKING:
    from .serving import Repository

logger = logging.getLogger("initpipeline")

BOOTING = "booting"
SERVING = "serving"
LEAVING = "leaving"

#: Seconds between two reports of a web process that has nothing new to say; a row not
#: refreshed for REPORT_STALE seconds is a process that is gone.
REPORT_INTERVAL = 60.0
REPORT_STALE = 3 * REPORT_INTERVAL
#: Rows of processes gone for this long are deleted by the next report of any process.
REPORT_FORGET = 24 * 3600.0

#: Seconds a turn to be replaced stays taken before its new worker shows up (Gunicorn
#: starts one within a second of the old one's exit).
TURN_GRACE = 30.0

#: How often a folder's workers are checked for being alive when the folder itself did
#: not change (a worker killed without its master's child_exit hook: no master, say).
LIVENESS_INTERVAL = 1.0


def servers_dir() -> Path:
    return cache_dir() / "servers"


class ServerFolder:
    """The folder of one Gunicorn server's workers on this host."""

    def __init__(self, master_pid: int) -> None:
        self.master_pid = master_pid
        self.master_start = process_start(master_pid)
        self.path = servers_dir() / f"{master_pid}-{self.master_start or 0}"
        #: (folder mtime, required names) -> (when checked, missing by pid)
        self._seen: tuple[tuple[int, tuple[str, ...]], float, dict[int, list[str]]] | None = None

    # -- a worker's own file --------------------------------------------------------------

    def write(self, pid: int, state: str, serves: list[str], generation: int | None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        data = {
            "pid": pid,
            "start": process_start(pid),
            "state": state,
            "serves": sorted(serves),
            "generation": generation,
            "at": time.time(),
        }
        tmp = self.path / f".{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path / f"{pid}.json")

    def remove(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            (self.path / f"{pid}.json").unlink()

    # -- every worker's -------------------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """The files of the live workers (those of gone ones are removed)."""
        found = []
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.name.endswith(".json"):
                continue
            try:
                data = json.loads(Path(entry.path).read_text())
                pid = int(data["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # Being replaced, or not ours.
            if not _alive(pid, data.get("start")):
                self.remove(pid)
                continue
            found.append(data)
        return found

    def others_serve(self, pid: int) -> bool:
        """Whether another worker of this server takes connections and serves something."""
        return any(
            w["pid"] != pid and w.get("state") == SERVING and w.get("serves")
            for w in self.workers()
        )

    def missing(self, required: list[str], *, pid: int) -> dict[int, list[str]]:
        """Workers of this server (other than ``pid``) that take connections but cannot
        serve all of ``required`` yet: pid -> the names they lack.

        Read again when the folder changes (a worker wrote or left), and at least every
        LIVENESS_INTERVAL to notice a worker that died: a probe costs a stat most times.
        """
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        key = (mtime, tuple(required))
        now = time.monotonic()
        seen = self._seen
        if seen is not None and seen[0] == key and now - seen[1] < LIVENESS_INTERVAL:
            return seen[2]
        lacking = {}
        for w in self.workers():
            if w["pid"] == pid or w.get("state") != SERVING:
                continue  # Booting workers take no connection; leaving ones take no more.
            names = [n for n in required if n not in set(w.get("serves") or ())]
            if names:
                lacking[int(w["pid"])] = names
        self._seen = (key, now, lacking)
        return lacking

    def serving(self, *, pid: int) -> list[dict[str, Any]]:
        """The files of the other workers that take connections."""
        return [w for w in self.workers() if w["pid"] != pid and w.get("state") == SERVING]

    # -- new workers for a new generation (swap="new-worker") ------------------------------
    #
    # One worker at a time makes way: it claims the server's turn (recycle.json, created
    # exclusively), and exits; Gunicorn starts a new worker, which loads the active
    # generation before it takes a connection, then gives the turn back. A new worker that
    # cannot load it loads what its siblings serve instead and marks the generation failed
    # (failed-<id>.json), so that the others stay as they are until RETRY_BACKOFF_MAX
    # has passed.

    def claim_turn(self, pid: int, generation: int | None) -> bool:
        """Take the server's turn to be replaced; False while another worker has it."""
        self.path.mkdir(parents=True, exist_ok=True)
        turn = self.path / "recycle.json"
        for _ in range(2):
            try:
                fd = os.open(turn, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if not self._abandoned():
                    return False
                # Its new worker died loading: take the turn over.
                logger.warning("taking over a turn to be replaced that no worker carries on")
                with contextlib.suppress(FileNotFoundError):
                    turn.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": pid, "generation": generation, "at": time.time()}, fh)
            return True
        return False

    def turn_taken(self) -> bool:
        """Whether a worker has the turn and it is carried on (see _abandoned)."""
        return self.turn() is not None and not self._abandoned()

    def _abandoned(self) -> bool:
        """A turn is carried on while the worker that took it lives (it is finishing its
        requests), or a new worker boots (it loads), or for TURN_GRACE seconds after it
        was taken (Gunicorn has not started the new worker yet)."""
        turn = self.turn()
        if turn is None:
            return False
        if time.time() - float(turn.get("at") or 0) < TURN_GRACE:
            return False
        if _alive(int(turn.get("pid") or 0), None):
            return False
        return not any(w.get("state") == BOOTING for w in self.workers())

    def turn(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.path / "recycle.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def give_turn_back(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / "recycle.json").unlink()

    def mark_failed(self, generation: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"failed-{generation}.json").write_text(json.dumps({"at": time.time()}))

    def failed_lately(self, generation: int | None, *, within: float) -> bool:
        """Whether a new worker of this server failed to load ``generation`` lately."""
        try:
            age = time.time() - (self.path / f"failed-{generation}.json").stat().st_mtime
        except FileNotFoundError:
            return False
        return age < within

    # -- the master -----------------------------------------------------------------------

    @staticmethod
    def prune() -> None:
        """Remove the folders of servers whose master is gone."""
        try:
            entries = list(os.scandir(servers_dir()))
        except FileNotFoundError:
            return
        for entry in entries:
            pid, _, start = entry.name.partition("-")
            if not pid.isdigit() or not start.isdigit():
                continue
            if not _alive(int(pid), int(start) or None):
                shutil.rmtree(entry.path, ignore_errors=True)


class Reporter:
    """Writes what one serving process serves: its file in the server's folder (when it
    is a Gunicorn worker) and its ``WebProcess`` row; a listener of its Repository."""

    def __init__(self, folder: ServerFolder | None) -> None:
        self.folder = folder
        self.state = BOOTING
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.key = f"{self.host}:{self.pid}:{process_start(self.pid) or int(time.time())}"
        self._reported: float = float("-inf")
        self._warned = False

    def __call__(self, repo: Repository) -> None:
        served = repo.current
        serves = list(served.loaded)
        if self.folder is not None and self.state != LEAVING:
            self.folder.write(self.pid, self.state, serves, served.generation_id)
        self.report(repo)

    def set_state(self, state: str, repo: Repository) -> None:
        self.state = state
        self(repo)

    def leaving(self) -> None:
        """SIGTERM: take no part in the server's readiness any more (no database here:
        this runs in a signal handler)."""
        self.state = LEAVING
        if self.folder is not None:
            with contextlib.suppress(OSError):
                self.folder.remove(self.pid)

    def report(self, repo: Repository) -> None:
        """The process's WebProcess row, with what it serves now."""
        from django.db import DatabaseError

        from .models import WebProcess

        served = repo.current
        progress = repo.progress
        now = datetime.now(UTC)
        fields = {
            "host": self.host[:255],
            "pid": self.pid,
            "server": f"gunicorn {self.folder.master_pid}" if self.folder is not None else "",
            "state": self.state,
            "generation_id": served.generation_id,
            "serves": {
                n: {
                    "digest": v.digest,
                    "generation": v.generation_id,
                    "seconds": round(v.seconds, 3),
                    "at": v.at,
                    "loaded": v.has_value,
                }
                for n, v in served.loaded.items()
            },
            "loading": {"target": progress.target, "since": dict(progress.loading.copy())},
            "failures": {
                n: {
                    "digest": f.digest,
                    "generation": f.generation_id,
                    "error": f.error,
                    "attempts": f.attempts,
                    "since": f.since,
                }
                for n, f in repo.failures.items()
            },
            "started_at": datetime.fromtimestamp(repo.started_at, UTC),
            "reported_at": now,
        }
        try:
            WebProcess.objects.update_or_create(key=self.key, defaults=fields)
            if time.monotonic() - self._reported > REPORT_INTERVAL:
                WebProcess.objects.filter(
                    reported_at__lt=datetime.fromtimestamp(time.time() - REPORT_FORGET, UTC)
                ).delete()
        except DatabaseError as exc:
            # A read-only database user, say: the web side is then not in the reports.
            if not self._warned:
                self._warned = True
                logger.warning("cannot record what this web process serves: %s", exc)
            return
        self._reported = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._reported >= REPORT_INTERVAL

    def forget(self) -> None:
        """At the process's exit: its file and its row go."""
        from django.db import DatabaseError

        from .models import WebProcess

        if self.folder is not None:
            self.folder.remove(self.pid)
        with contextlib.suppress(DatabaseError):
            WebProcess.objects.filter(key=self.key).delete()
