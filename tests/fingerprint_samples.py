"""Phases whose fingerprints tests/test_codehash.py compares across Python versions.

Other interpreters import this module without Django, so it imports nothing but the
standard library and initpipeline.registry. The phases use much of the syntax of Python
3.11 (the oldest the project supports): f-strings with nested format specs (whose AST
3.12.0 and 3.12.1 build differently), match, walrus, async, try/except*, lambdas,
comprehensions, decorators, nested functions and classes, every kind of constant.
Editing this file changes the golden fingerprints in tests/test_codehash.py: that is
what they are for.
"""

from __future__ import annotations

import sys
from typing import Any

from initpipeline.registry import Registry

registry = Registry(_discovered=True)
phase = registry.phase

SCALE = 3


def pad(values: list[int], *, width: int = 8) -> list[str]:
    """A function named in code=."""
    return [f"{v:>{width}}|{v!r:^{width + 2}}|{v:#x}" for v in values]


class Tokenizer:
    """A class named in code=."""

    pattern: str = r"\w+"

    def split(self, text: str) -> list[str]:
        return [t for t in text.split() if t.strip()]


@phase(produces="numbers", version="2", config={"n": 10, "mode": "fast"}, timeout=60)
def numbers(ctx: Any) -> None:
    """Numbers, with most kinds of constant."""
    constants = (1, -2, 3.5, 1e300, 2j, 10**30, 0xFF, b"\x00\xff", "ünïcode", None, ..., True)
    big = 123456789012345678901234567890
    values = [i * SCALE for i in range(ctx.config["n"]) if i % 2 == 0]
    squares = {i: i**2 for i in values}
    unique = {i % 3 for i in values}
    lazy = (i for i in values)
    merged = {**squares, "extra": [*values, *unique]}
    if (count := len(values)) > 3 and 0 < count <= 100:
        values = values[1:-1:2]
    del lazy
    ctx.save_json("numbers", [values, merged, str(constants), str(big), count])


@phase(produces="labels", after=["numbers"], code=[pad, Tokenizer, sys.modules[__name__]])
def labels(ctx: Any) -> None:
    numbers, *rest = ctx.load("numbers")
    labelled: list[str] = []

    def label(value: int, /, prefix: str = "", *args: Any, sep: str = ":", **kw: Any) -> str:
        """A nested function: its docstring does not count either."""
        nonlocal labelled
        match value:
            case 0:
                return f"{prefix}{sep}zero"
            case int(n) if n < 0:
                return f"{prefix}{sep}negative {n!s}"
            case [first, *_]:
                return f"list from {first}"
            case {"key": k, **others}:
                return f"map {k} {len(others)}"
            case Tokenizer(pattern=p):
                return p
            case _:
                return f"{prefix}{sep}{value:>{len(prefix) + 4}.2f}"

    class Local:
        """A nested class."""

        @staticmethod
        def twice(x: int) -> int:
            return x * 2

    async def fetch(items: list[int]) -> list[int]:
        async with ctx.lock() as lock, ctx.other():
            return [x async for x in lock.iterate(items)]

    try:
        for n in numbers:
            labelled.append(label(n, "n"))
        else:
            labelled.sort(key=lambda s: (len(s), s), reverse=True)
    except* ValueError as group:
        raise RuntimeError("bad labels") from group
    finally:
        assert labelled or not numbers, "no labels"
    while False:
        break
    global SCALE
    x = Local().twice(2) if labelled else -1
    ctx.save_json("labels", [labelled, pad(numbers), x, rest, fetch])
