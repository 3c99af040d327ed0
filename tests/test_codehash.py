"""codehash.py: what counts as a code change, and the same hash on every supported Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from initpipeline import codehash
from initpipeline.registry import Registry
from tests import fingerprint_samples
from tests.codeapp.source import load
from tests.conftest import missing_service

ROOT = Path(__file__).resolve().parent.parent


def function_hash(tmp_path: Path, source: str, name: str = "f", **kwargs: Any) -> str:
    """The code hash of function ``name`` defined by ``source`` in a file of its own."""
    path = tmp_path / f"m{abs(hash(source))}.py"
    path.write_text(textwrap.dedent(source))
    module = load(path, path.stem)
    return codehash.phase_code_hash(getattr(module, name), **kwargs).sha256


BASE = """
    from initpipeline.registry import Registry
    phase = Registry().phase

    def deco(fn):
        return fn

    @phase(produces="out", timeout=10)
    def f(ctx):
        '''Docstring.'''
        total = 0
        for i in range(10):  # count
            total += i
        return total
"""


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("  # count", "  # add them up"),
        ("'''Docstring.'''", "'''Another docstring,\n        on two lines.'''"),
        ("'''Docstring.'''", ""),
        ("total += i", "total  +=  (i)"),
        ("for i in range(10):", "for i in range(\n            10,\n        ):"),
        ("timeout=10", "timeout=20, retries=3"),
        ('@phase(produces="out", timeout=10)', ""),
    ],
)
def test_what_cannot_change_a_result_does_not_count(tmp_path: Path, old: str, new: str) -> None:
    assert BASE.count(old) == 1
    assert function_hash(tmp_path, BASE.replace(old, new)) == function_hash(tmp_path, BASE)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("total += i", "total += i * 2"),
        ("range(10)", "range(11)"),
        ("total = 0", "total = 0.0"),
        ("return total", "return str(total)"),
        ("def f(ctx):", "def f(ctx, scale=1):"),
        # Decorators other than @phase count as written.
        ('@phase(produces="out", timeout=10)', '@phase(produces="out")\n    @deco'),
        # A string statement that is not the first of its body is code, not a docstring.
        ("return total", "'''note'''\n        return total"),
    ],
)
def test_what_can_change_a_result_counts(tmp_path: Path, old: str, new: str) -> None:
    assert BASE.count(old) == 1
    assert function_hash(tmp_path, BASE.replace(old, new)) != function_hash(tmp_path, BASE)


def test_nested_functions_count_without_their_docstrings(tmp_path: Path) -> None:
    source = """
        def f(ctx):
            def inner(x):
                '''Inner.'''
                return x + 1

            class Local:
                '''Local.'''

            return inner(1), Local
    """
    same = source.replace("'''Inner.'''", "'''Changed.'''").replace("'''Local.'''", "pass")
    assert function_hash(tmp_path, same) != function_hash(tmp_path, source)  # pass is code
    same = source.replace("'''Inner.'''", "'''Changed.'''").replace("'''Local.'''", "'''L.'''")
    assert function_hash(tmp_path, same) == function_hash(tmp_path, source)
    other = source.replace("x + 1", "x + 2")
    assert function_hash(tmp_path, other) != function_hash(tmp_path, source)


def test_indented_definition_with_a_string_at_column_0(tmp_path: Path) -> None:
    # textwrap.dedent could not undo the indentation of g's source: its string starts a
    # line at column 0.
    source = 'def f():\n    def g(ctx):\n        return """\nx"""\n    return g\n'
    path = tmp_path / "indented.py"
    path.write_text(source)
    assert codehash.phase_code_hash(load(path, "indented").f()).without_source == ()


def test_lambda_phase(tmp_path: Path) -> None:
    first = function_hash(tmp_path, "f = lambda ctx: ctx.save_json('out', 1)\n")
    again = function_hash(tmp_path, "f = lambda ctx: ctx.save_json('out', 1)  # one\n")
    other = function_hash(tmp_path, "f = lambda ctx: ctx.save_json('out', 2)\n")
    assert first == again != other


def test_without_source_the_bytecode_counts_and_the_phase_says_so() -> None:
    namespace: dict[str, Any] = {"__name__": "generated"}
    exec("def f(ctx):\n    '''Doc.'''\n    return 1\n", namespace)
    first = codehash.phase_code_hash(namespace["f"])
    assert first.without_source == ("generated.f",)
    exec("def f(ctx):\n    '''Other doc.'''\n    return 1\n", namespace)
    assert codehash.phase_code_hash(namespace["f"]) == first
    exec("def f(ctx):\n    return 2\n", namespace)
    assert codehash.phase_code_hash(namespace["f"]).sha256 != first.sha256


def test_named_code_counts_in_any_order(tmp_path: Path) -> None:
    lib = tmp_path / "lib_mod.py"
    lib.write_text('"""Doc."""\n\nSCALE = 2\n\n\ndef scale(x):\n    return x * SCALE\n')
    module = load(lib, "lib_mod")

    def f(ctx: Any) -> None:
        pass

    base = codehash.phase_code_hash(f).sha256
    with_module = codehash.phase_code_hash(f, [module, module.scale]).sha256
    assert codehash.phase_code_hash(f, [module.scale, module]).sha256 == with_module
    assert len({base, with_module, codehash.phase_code_hash(f, [module.scale]).sha256}) == 3
    # A module counts whole: a constant outside the function changes its hash.
    lib.write_text(lib.read_text().replace("SCALE = 2", "SCALE = 3"))
    edited = load(lib, "lib_mod_2")
    assert (
        codehash.phase_code_hash(f, [edited.scale]).sha256
        == codehash.phase_code_hash(f, [module.scale]).sha256
    )
    assert codehash.phase_code_hash(f, [edited, edited.scale]).sha256 != with_module


def test_code_takes_only_modules_classes_and_functions() -> None:
    with pytest.raises(TypeError, match=r"takes modules, classes and functions, not 'x'"):
        Registry().phase(produces="out", code=["x"])


def test_deep_expressions_do_not_hit_the_recursion_limit() -> None:
    # 2000 nested additions: deeper than sys.getrecursionlimit(), and still parsed by 3.11.
    source = "x = " + " + ".join(["a"] * 2000) + "\n"
    assert len(codehash.source_digest(source)) == 64


# -- the same hash on every supported Python --------------------------------------------------

#: sha256 of tests/fingerprint_samples.py's phases, on Python 3.11, 3.12 and 3.13 alike.
#: A change here means every deployed artifact is rebuilt once: change the normalisation
#: (codehash.py) or the recipe (registry.py) only on purpose, and say so in the changelog.
GOLDEN = {
    "numbers": "db8e193f2c8f0781b506f96f3afb42821194be66f02327a2ac738ecd18791837",
    "labels": "78ed5bd333e780b51016d3e3076f3e77b9553a1540e10506ff3482235d4c1410",
}


def test_fingerprints_match_the_golden_values_on_this_python() -> None:
    pipeline = fingerprint_samples.registry.pipeline()
    assert {n: p.code_hash.without_source for n, p in pipeline.phases.items()} == {
        "numbers": (),
        "labels": (),
    }
    assert pipeline.fingerprints() == GOLDEN, sys.version


#: What the other interpreters run: the fingerprints of the samples, and the digest of each
#: file of initpipeline (a larger corpus of ordinary code).
PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from initpipeline import codehash
from tests import fingerprint_samples
files = sorted(Path(sys.argv[1], "initpipeline").rglob("*.py"))
print(json.dumps({
    "fingerprints": fingerprint_samples.registry.pipeline().fingerprints(),
    "files": {str(p): codehash.source_digest(p.read_text()) for p in files},
}))
"""


def other_pythons() -> list[str]:
    """The interpreters of the supported minor versions other than this one (via pyenv)."""
    try:
        listed = subprocess.run(
            ["pyenv", "versions", "--bare"], capture_output=True, text=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return []
    this = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = []
    for minor in ("3.11", "3.12", "3.13"):
        versions = [v for v in listed if v == minor or v.startswith(minor + ".")]
        if minor == this or not versions:
            continue
        which = subprocess.run(
            ["pyenv", "which", "python"],
            env={**os.environ, "PYENV_VERSION": versions[-1]},
            capture_output=True,
            text=True,
            timeout=30,
        )
        if which.returncode == 0:
            found.append(which.stdout.strip())
    return found


def test_fingerprints_are_the_same_on_every_supported_python() -> None:
    pythons = other_pythons()
    if not pythons:
        missing_service("no other Python 3.11-3.13 found through pyenv (pyenv install 3.12 3.13)")
    here = json.loads(
        subprocess.run(
            [sys.executable, "-c", PROBE, str(ROOT)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    assert here["fingerprints"] == GOLDEN
    for python in pythons:
        result = subprocess.run(
            [python, "-c", PROBE, str(ROOT)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{python}: {result.stderr}"
        there = json.loads(result.stdout)
        assert there["fingerprints"] == here["fingerprints"], python
        assert there["files"] == here["files"], python
