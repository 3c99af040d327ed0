"""The demo's phase functions called the way a user without initpipeline would.

One process, in order, files in a folder: no broker, no database, no checksums.
``python -m bench.plain OUTDIR`` prints the seconds each phase took, as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from initpipeline.shards import Shard


class PlainContext:
    """Just enough of PhaseContext for the demo phases: files in a folder."""

    def __init__(self, phase: Any, outdir: Path) -> None:
        self.phase = phase
        self.name = phase.name
        self.config = phase.resolved_config()
        self.attempt = 1
        self.logger = logging.getLogger(f"plain.{phase.name}")
        self.outdir = outdir
        # A sharded phase runs whole, as its one shard; a plain process never resumes:
        # it starts over.
        self.shard = Shard(0, 1)
        self.resumed = None
        self.stopping = False

    def progress(
        self, done: float, total: float | None = None, message: str = "", **kw: Any
    ) -> None:
        pass

    def heartbeat(self, **kw: Any) -> None:
        pass

    def checkpoint(self, state: Any, **kw: Any) -> None:
        pass

    def scratch_path(self, suffix: str = "") -> Path:
        return self.outdir / f"{uuid.uuid4().hex}{suffix}"

    def save_json(self, name: str, value: Any, **kw: Any) -> None:
        (self.outdir / f"{name}.json").write_text(json.dumps(value))

    def save_array(self, name: str, array: Any, **kw: Any) -> None:
        np.save(self.outdir / f"{name}.npy", array)

    def save_file(self, name: str, source: Path, **kw: Any) -> None:
        shutil.move(str(source), self.outdir / f"{name}.file")

    def load(self, name: str) -> Any:
        for suffix, loader in (
            (".json", lambda p: json.loads(p.read_text())),
            (".npy", lambda p: np.load(p, mmap_mode="r")),
            (".file", lambda p: p),
        ):
            path = self.outdir / f"{name}{suffix}"
            if path.exists():
                return loader(path)
        raise FileNotFoundError(name)


def run_phases(outdir: Path) -> dict[str, float]:
    """Run every phase of the project's pipeline in order; seconds per phase."""
    import django

    django.setup()
    from initpipeline.registry import get_pipeline

    pipeline = get_pipeline()
    outdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for name in pipeline.order():
        phase = pipeline.phases[name]
        started = time.perf_counter()
        phase.func(PlainContext(phase, outdir))  # type: ignore[arg-type]
        timings[name] = time.perf_counter() - started
    return timings


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    print(json.dumps(run_phases(Path(sys.argv[1]))))
