"""Sharded phases: one phase split over many Celery tasks, then merged.

A phase with ``shards=N`` becomes, in a run, N shard rows (``name#0`` ... ``name#N-1``),
each a task of its own with its own record, heartbeat, progress, attempts, losses and
checkpoints, and the phase's own row, which waits for every shard (the run's records are
the join barrier, as for parallel phases) and merges their parts into the phase's
artifacts. Downstream phases and web processes only ever see the merged artifacts.

A shard saves its part of artifact ``a`` with the usual ``ctx.save_*("a", ...)``; it is
recorded as ``a.shard-0003-of-0008`` under the shard's own fingerprint (the phase's, its
index and the count), so a run that resumes after a failure finds the shards that
succeeded cached and runs only the others.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import formats
from .exceptions import PipelineConfigError
from .registry import part_name as part_name

if TYPE_CHECKING:
    from .context import PhaseContext


@dataclass(frozen=True)
class Shard:
    """Which shard a task of a sharded phase is: ``ctx.shard``."""

    index: int
    count: int

    def slice(self, n: int) -> range:
        """The contiguous part of ``n`` items this shard takes (shards' parts stay in order)."""
        return range(n * self.index // self.count, n * (self.index + 1) // self.count)


def row_name(phase: str, index: int) -> str:
    """The name of a shard's record in a run."""
    return f"{phase}#{index}"


def fingerprint(phase_fingerprint: str, index: int, count: int) -> str:
    """A shard's fingerprint: its phase's, its index and the count."""
    return hashlib.sha256(f"{phase_fingerprint}:shard:{index}/{count}".encode()).hexdigest()


# -- the default merge ----------------------------------------------------------------------


def merge_default(ctx: PhaseContext) -> None:
    """Publish each artifact from its parts, in shard order, by their format: JSON lists
    concatenated, arrays stacked along their first axis, bytes and files joined. Streams:
    an array is copied part by part into a memory-mapped file, never held whole."""
    for name in ctx.phase.produces:
        fmt = ctx.part_format(name)
        paths = ctx.parts(name)
        merger = _MERGERS.get(fmt)
        if merger is None:
            raise PipelineConfigError(
                f"phase {ctx.name!r}: the parts of {name!r} are {fmt} files, which have no "
                "default merge; give the phase a merge= function"
            )
        merger(ctx, name, paths)


def _merge_json(ctx: PhaseContext, name: str, paths: list[Path]) -> None:
    # A JSON list is "[", its items, "]" (whitespace around them aside): the merged list is
    # the parts' items joined by commas. Streamed: no part is parsed or held whole.
    def write(path: Path) -> None:
        with open(path, "wb") as out:
            out.write(b"[")
            empty = True
            for i, part in enumerate(paths):
                with open(part, "rb") as src:
                    items = _list_items(src)
                    if items is None:
                        value = formats.read(part, "json")
                        raise PipelineConfigError(
                            f"phase {ctx.name!r}: shard {i}'s part of {name!r} is a JSON "
                            f"{type(value).__name__}, not a list; give the phase a merge= "
                            "function"
                        )
                    start, size = items
                    if size:
                        if not empty:
                            out.write(b",")
                        src.seek(start)
                        _copy(src, out, size)
                        empty = False
                ctx.progress(i + 1, len(paths), f"merged {name}: part {i + 1} of {len(paths)}")
            out.write(b"]")

    ctx.save_prepared(name, "json", write, None)


_SPACE = b" \t\r\n"


def _list_items(src: BinaryIO) -> tuple[int, int] | None:
    """Where the items of the JSON list in ``src`` are (offset, length; length 0 for an
    empty list), or None when it holds no list. The file is valid JSON (it verified)."""
    head = src.read(64 * 1024)
    first = len(head) - len(head.lstrip(_SPACE))
    if head[first : first + 1] != b"[":
        return None
    end = src.seek(0, 2)
    src.seek(max(0, end - 64 * 1024))
    tail = src.read()
    last = end - (len(tail) - len(tail.rstrip(_SPACE))) - 1  # the closing "]"
    inside = head[first + 1 :]
    start = first + 1 + len(inside) - len(inside.lstrip(_SPACE))
    # Trailing whitespace inside the brackets is harmless in the merged list.
    return start, max(0, last - start)


def _copy(src: BinaryIO, out: BinaryIO, size: int) -> None:
    """Copy ``size`` bytes from ``src``'s position to ``out``, a chunk at a time."""
    while size > 0:
        chunk = src.read(min(formats.CHUNK, size))
        if not chunk:
            raise OSError(f"{src.name} ended {size} bytes early")
        out.write(chunk)
        size -= len(chunk)


def _merge_npy(ctx: PhaseContext, name: str, paths: list[Path]) -> None:
    import numpy as np

    parts = [formats.read(p, "npy") for p in paths]
    rest = {(part.shape[1:], part.dtype) for part in parts}
    if len(rest) != 1:
        raise PipelineConfigError(
            f"phase {ctx.name!r}: the parts of {name!r} differ in shape or dtype "
            f"({sorted(str(r) for r in rest)}); give the phase a merge= function"
        )
    shape, dtype = rest.pop()
    total = sum(part.shape[0] for part in parts)

    def write(path: Path) -> None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(total, *shape))
        row = 0
        for i, part in enumerate(parts):
            out[row : row + part.shape[0]] = part
            row += part.shape[0]
            ctx.progress(i + 1, len(parts), f"merged {name}: part {i + 1} of {len(parts)}")
        out.flush()
        del out

    ctx.save_prepared(name, "npy", write, {"shape": [total, *shape], "dtype": str(dtype)})


def _join(fmt: str) -> Callable[[PhaseContext, str, list[Path]], None]:
    def join(ctx: PhaseContext, name: str, paths: list[Path]) -> None:
        def write(path: Path) -> None:
            with open(path, "wb") as out:
                for i, part in enumerate(paths):
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, formats.CHUNK)
                    ctx.progress(i + 1, len(paths), f"merged {name}: part {i + 1}")

        ctx.save_prepared(name, fmt, write, None)

    return join


_MERGERS: dict[str, Callable[[PhaseContext, str, list[Path]], None]] = {
    "json": _merge_json,
    "npy": _merge_npy,
    "bytes": _join("bytes"),
    "file": _join("file"),
}
