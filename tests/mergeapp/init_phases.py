"""A sharded phase with a merge of its own, for tests/test_shards.py.

    rows (3 shards, merged by join_rows) ──► report

Each shard saves ``rows`` (JSON: its numbers and its index) and ``blob`` (bytes: one line
per number). ``join_rows`` reads the rows' parts loaded (``load_parts``) and the blobs' as
files (``parts``), and writes the joined blob piece by piece (``save_prepared``). Every run
of the merge appends "<run> <pid> <worker> <rows' format> <blob's format>" to
``$INITPIPELINE_VAR_DIR/merges.log``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from initpipeline import PhaseContext, phase
from tests.testapp.work import var_dir

COUNT = 10
SHARDS = 3


def join_rows(ctx: PhaseContext) -> None:
    found = (ctx.part_format("rows"), ctx.part_format("blob"))
    with open(var_dir() / "merges.log", "a") as log:
        log.write(f"{ctx.run_id} {os.getpid()} {ctx.worker} {found[0]} {found[1]}\n")
    parts = ctx.load_parts("rows")
    ctx.save_json(
        "rows",
        {"sizes": [len(part) for part in parts], "rows": [r for part in parts for r in part]},
    )
    paths = ctx.parts("blob")

    def write(path: Path) -> None:
        with open(path, "wb") as out:
            for part in paths:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out)

    ctx.save_prepared("blob", "bytes", write, metadata={"parts": len(paths)})


@phase(produces=["rows", "blob"], shards=SHARDS, merge=join_rows)
def rows(ctx: PhaseContext) -> None:
    assert ctx.shard is not None
    mine = list(ctx.shard.slice(COUNT))
    ctx.save_json("rows", [{"n": n, "shard": ctx.shard.index} for n in mine])
    ctx.save_bytes("blob", "".join(f"{n}\n" for n in mine).encode())


@phase(produces="report", inputs=["rows", "blob"])
def report(ctx: PhaseContext) -> None:
    ctx.save_json("report", {"rows": ctx.load("rows"), "blob": ctx.load("blob").decode()})
