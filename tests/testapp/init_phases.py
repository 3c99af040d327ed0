"""A small pipeline the tests steer through a JSON control file shared by every process.

    a ──► b ──► c

The control file (``$INITPIPELINE_VAR_DIR/control.json``) may hold:
  versions: {phase: str}   goes into the phase's config, so its fingerprint changes
  fail:     [phase, ...]   the phase raises (fail_text: {phase: text}, its error's text)
  sleep:    {phase: s}     the phase works this long, reporting progress
  message:  {phase: text}  the progress message, instead of "step i of n"
  checkpoint: {phase: n}   the phase checkpoints {"step": i} every n steps (of its sleep's
                           0.1 s steps), resumes from it, and hands off with it
  quiet:    [phase, ...]   the phase sleeps without a progress() or heartbeat() call
  fail_attempts: {phase: n}  the phase raises on its first n attempts
  pickle:   [phase, ...]   a (or c) saves its artifact as a signed pickle instead of JSON
  slow_write: {phase: {"bytes": n, "seconds": s}}
                           c writes its artifact as an n-byte file (JSON padded with spaces)
                           over s seconds, then publishes it with save_file (format "file",
                           so only for c, which nothing loads); its progress message says
                           "writing ..." meanwhile
  heartbeat: {phase: s}    the phase works this long calling ctx.heartbeat() every 0.1 s and
                           never progress() (it wins over sleep)
  hold:     [phase, ...]   after its work, the phase reports progress every 0.1 s for as long
                           as it is listed here (read again at each step, up to 120 s): a
                           test holds a run in flight until it rewrites the control file
  silent:   {phase: s}     until it is first lost, the phase calls neither progress() nor
                           heartbeat(): it only reads its record until that is no longer its
                           own (recovery took the phase over), at most s seconds; the copy
                           that takes it over works as usual

Every start of a phase appends "<phase> <run> <attempt> <pid>" to
``$INITPIPELINE_VAR_DIR/executions.log``, so tests can count how often a phase really ran,
"<phase> <run> <first step> <steps>" to ``starts.log`` (where it (re)started), and every
progress() or heartbeat() call it makes appends, just before the call,
"<phase> <run> <attempt> progress|heartbeat <step> <unix time>" to ``calls.log`` beside it,
so tests can tell what a phase did after an event recorded in the database.

``retries=`` and ``timeout=`` are fixed when this module is imported. The environment
variable ``TESTAPP_PHASE_OPTIONS`` (JSON, ``{phase: {"retries": n, "timeout": s}}``) changes
them for the process that imports it: given to ``start_init``, it ends up in the run's
records, which is where workers and recovery read them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from initpipeline import PhaseContext, phase
from tests.testapp.work import control, do_work


def _options(name: str, **defaults: Any) -> dict[str, Any]:
    given = json.loads(os.environ.get("TESTAPP_PHASE_OPTIONS") or "{}").get(name, {})
    return {**defaults, **given}


def _config(name: str) -> Any:
    return lambda: {"v": control().get("versions", {}).get(name, "1")}


def _save(ctx: PhaseContext, name: str, value: Any) -> None:
    ctl = control()
    slow = ctl.get("slow_write", {}).get(ctx.name)
    if slow:
        data = json.dumps(value).encode()
        data += b" " * max(0, int(slow["bytes"]) - len(data))
        chunks = 50
        size = -(-len(data) // chunks)
        path = ctx.scratch_path(".json")
        with open(path, "wb") as fh:
            for i in range(chunks):
                fh.write(data[i * size : (i + 1) * size])
                fh.flush()
                ctx.progress(i + 1, chunks + 1, f"writing {name}: chunk {i + 1} of {chunks}")
                time.sleep(float(slow["seconds"]) / chunks)
        ctx.save_file(name, path)
    elif ctx.name in ctl.get("pickle", []):
        ctx.save_pickle(name, value)
    else:
        ctx.save_json(name, value)


@phase(produces="a_out", config=_config("a"), **_options("a"))
def a(ctx: PhaseContext) -> None:
    do_work(ctx)
    _save(ctx, "a_out", {"numbers": list(range(10)), "v": ctx.config["v"]})


@phase(produces="b_out", after="a", config=_config("b"), **_options("b"))
def b(ctx: PhaseContext) -> None:
    numbers = ctx.load("a_out")["numbers"]
    do_work(ctx)
    import numpy as np

    # The version shows in the bytes, so a bumped b publishes a different file.
    ctx.save_array("b_out", np.asarray(numbers, dtype=np.float32) * 2 + float(ctx.config["v"]))


@phase(produces="c_out", inputs=["b_out"], config=_config("c"), **_options("c", retries=2))
def c(ctx: PhaseContext) -> None:
    total = float(ctx.load("b_out").sum())
    do_work(ctx)
    _save(ctx, "c_out", {"total": total, "attempt": ctx.attempt})
