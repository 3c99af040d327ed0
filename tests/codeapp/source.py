"""The source of a small pipeline x -> y -> z that tests edit to see what counts in a
fingerprint: tests/test_planning.py loads versions of it in-process, tests/codeapp runs it
in worker subprocesses.

``PHASES`` is the first version. A test makes the next with ``edit()``, which insists that
the text it replaces is there, so every edit in a test reads as the diff it is.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

#: Registers into a registry of the module's own (a test's), not the project's.
OWN_REGISTRY = (
    "from initpipeline.registry import Registry\n\nregistry = Registry()\nphase = registry.phase\n"
)
#: Registers into the project's registry (tests/codeapp/init_phases.py).
PROJECT_REGISTRY = "from initpipeline import phase\n"

PHASES = '''\
"""Three phases: x makes numbers, y scales them, z adds them up."""

import {scaling} as scaling

{header}

@phase(produces="x_out", config={{"n": 4}})
def x(ctx):
    """The numbers 0..n-1."""
    ctx.save_json("x_out", list(range(ctx.config["n"])))


@phase(produces="y_out", inputs=["x_out"], timeout=60, code=[scaling])
def y(ctx):
    """The numbers, scaled."""
    numbers = ctx.load("x_out")
    # Scale each number.
    ctx.save_json("y_out", [scaling.scale(n) for n in numbers])


@phase(produces="z_out", inputs=["y_out"])
def z(ctx):
    ctx.save_json("z_out", {{"total": sum(ctx.load("y_out"))}})
'''

SCALING = '''\
"""How y scales."""


def scale(n):
    return n * 2
'''


def edit(source: str, old: str, new: str) -> str:
    """``source`` with ``old`` (which must occur exactly once) replaced by ``new``."""
    assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times"
    return source.replace(old, new)


def load(path: Path, name: str) -> types.ModuleType:
    """Execute the file at ``path`` as module ``name``, compiled from its source.

    No bytecode cache is read or written: a file rewritten within the same second with
    the same size would otherwise be run from a stale ``.pyc``, whose code would not be
    the source the fingerprint reads.
    """
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module
