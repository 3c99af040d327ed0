"""The code of a phase, normalised and hashed: the part of its fingerprint that sees code.

Comments, docstrings and formatting do not count. The hash is taken over the abstract
syntax tree (AST) of the source, serialised here rather than by ``ast.dump``, whose output
differs between Python versions. Fields that are None or empty lists are left out, and so
are ``ctx`` (load or store: the position in the tree already says it), ``kind`` (the ``u``
prefix of a string) and ``type_comment``, and every position attribute. That way the same
source gives the same hash on Python 3.11, 3.12 and 3.13 (3.12 added ``type_params`` to
function and class definitions, empty unless used), and a deploy to a host on another
Python does not rebuild anything.

Where no source can be read (a function made by ``exec``, a deployment that ships ``.pyc``
files only), the hash falls back to the compiled code object: its bytecode, constants and
names, nested code objects included. That hash ignores comments and formatting too, but it
changes with the Python version. ``CodeHash.without_source`` names such objects, and
system check ``initpipeline.W006`` reports them.

This module imports nothing but the standard library, so that tests can load it by path
on other interpreters.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

#: AST fields that never change what code does, or that differ between Python versions.
_IGNORED_FIELDS = frozenset({"ctx", "kind", "type_comment"})
#: Nodes whose body may start with a docstring.
_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class NoSource(Exception):
    """The object's source cannot be read, or does not parse as the object."""


@dataclass(frozen=True)
class CodeHash:
    """The sha256 of a phase's code and the code it names; ``without_source``: what fell back."""

    sha256: str
    without_source: tuple[str, ...] = ()


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _is_phase_decorator(node: ast.expr) -> bool:
    """``@phase(...)``, ``@initpipeline.phase(...)`` or ``@registry.phase(...)``."""
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Name):
        return target.id == "phase"
    return isinstance(target, ast.Attribute) and target.attr == "phase"


def _constant(value: Any) -> str:
    # Each type is tagged, so 1, 1.0, True and "1" never give the same token. Ints and
    # floats in hexadecimal: exact, and free of str()'s 4300-digit limit.
    if value is None:
        return "None"
    if value is Ellipsis:
        return "Ellipsis"
    if isinstance(value, bool):
        return f"bool:{value}"
    if isinstance(value, int):
        return f"int:{value:x}"
    if isinstance(value, float):
        return f"float:{value.hex()}"
    if isinstance(value, complex):
        return f"complex:{value.real.hex()},{value.imag.hex()}"
    if isinstance(value, str):
        return "str:" + json.dumps(value)
    if isinstance(value, bytes):
        return f"bytes:{value.hex()}"
    if isinstance(value, tuple | frozenset):
        items = sorted(map(_constant, value)) if isinstance(value, frozenset) else value
        return f"{type(value).__name__}:" + json.dumps([_constant(v) for v in items])
    raise TypeError(f"unexpected constant in an AST: {type(value).__name__}")


@dataclass(frozen=True)
class _Token:
    text: str


def _fstring_parts(values: list[ast.expr]) -> list[Any]:
    """The parts of an f-string with adjacent literal parts joined and empty ones dropped.

    Python 3.12.0 and 3.12.1 put an empty literal at the end of a nested format spec
    (``f"{x:>{width}}"``), which 3.11 and 3.13 do not.
    """
    parts: list[Any] = []
    for part in values:
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            if not part.value:
                continue
            if parts and isinstance(parts[-1], str):
                parts[-1] += part.value
                continue
            parts.append(part.value)
        else:
            parts.append(part)
    return [ast.Constant(value=p) if isinstance(p, str) else p for p in parts]


def _tokens(root: ast.AST) -> Iterator[str]:
    """The tree as a flat sequence of tokens; iterative, so deep expressions never overflow
    the recursion limit."""
    stack: list[Any] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, _Token):
            yield item.text
        elif isinstance(item, ast.AST):
            children: list[Any] = [_Token(f"({type(item).__name__}")]
            for name in item._fields:
                if name in _IGNORED_FIELDS:
                    continue
                value = getattr(item, name, None)
                if name == "body" and isinstance(item, _DOCSTRING_OWNERS) and value:
                    value = value[1:] if _is_docstring(value[0]) else value
                elif name == "values" and isinstance(item, ast.JoinedStr):
                    value = _fstring_parts(item.values)
                if value is None or (isinstance(value, list) and not value):
                    continue
                children += [_Token(f"{name}="), value]
            children.append(_Token(")"))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([_Token("["), *item, _Token("]")]))
        else:
            yield _constant(item)


def tree_digest(node: ast.AST) -> str:
    """sha256 of a normalised AST (docstrings left out)."""
    digest = hashlib.sha256()
    for token in _tokens(node):
        digest.update(token.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def source_digest(source: str) -> str:
    """sha256 of a module's source: comments, docstrings and formatting do not count."""
    return tree_digest(ast.parse(source))


def _statements(source: str) -> list[ast.stmt]:
    """The statements of a piece of source that ``inspect.getsource`` returned.

    The source of a nested function is indented. ``textwrap.dedent`` cannot undo that when
    a multi-line string inside the function starts lines further left; wrapping the piece
    in an ``if`` block lets the parser take the indentation as it is.
    """
    if source[:1] in (" ", "\t"):
        block = ast.parse("if 1:\n" + source).body[0]
        assert isinstance(block, ast.If)
        return block.body
    return ast.parse(source).body


def _definition(obj: Any) -> ast.AST:
    """The AST of a function, lambda or class, from its source; raises NoSource."""
    try:
        source = inspect.getsource(obj)
        statements = _statements(source)
    except (OSError, TypeError, SyntaxError, IndentationError) as exc:
        raise NoSource(str(exc)) from exc
    name = getattr(obj, "__name__", "")
    if name == "<lambda>":
        # getsource returns the lines around a lambda: find the one lambda in them.
        lambdas = [n for s in statements for n in ast.walk(s) if isinstance(n, ast.Lambda)]
        if len(lambdas) != 1:
            raise NoSource("the lines of this lambda hold another one")
        return lambdas[0]
    node = statements[0] if statements else None
    if not isinstance(node, _DEFINITIONS) or node.name != name:
        raise NoSource(f"the source found for {name!r} does not define it")
    return node


def _code_object_tokens(code: types.CodeType, doc: str | None) -> Iterator[str]:
    yield f"bytecode-{sys.version_info[0]}.{sys.version_info[1]}"
    yield code.co_code.hex()
    yield json.dumps([code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars])
    consts = list(code.co_consts)
    if doc is not None and consts and consts[0] == doc:
        consts = consts[1:]
    for const in consts:
        if isinstance(const, types.CodeType):
            # A nested function's docstring is one of its constants: it counts here.
            yield "("
            yield from _code_object_tokens(const, None)
            yield ")"
        else:
            yield _constant(const)


def _bytecode_digest(func: Any) -> str | None:
    code = getattr(inspect.unwrap(func), "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    digest = hashlib.sha256()
    for token in _code_object_tokens(code, getattr(func, "__doc__", None)):
        digest.update(token.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _label(obj: Any) -> str:
    """``module.qualname`` of a function or class; a module's name."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    qualname = str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", repr(obj)))
    module = getattr(obj, "__module__", None)
    return f"{module}.{qualname}" if module else qualname


def _object_digest(obj: Any, *, phase: bool = False) -> tuple[str, bool]:
    """(digest, from source?) of a phase function or of an object named in ``code=``."""
    if isinstance(obj, types.ModuleType):
        try:
            return "source:" + source_digest(inspect.getsource(obj)), True
        except (OSError, TypeError, SyntaxError) as exc:
            path = getattr(obj, "__file__", None)
            if path:
                try:
                    with open(path, "rb") as fh:
                        return "file:" + hashlib.sha256(fh.read()).hexdigest(), False
                except OSError:
                    pass
            return f"unavailable:{obj.__name__}:{type(exc).__name__}", False
    try:
        node = _definition(obj)
    except NoSource:
        fallback = _bytecode_digest(obj)
        return fallback or f"unavailable:{_label(obj)}", False
    if phase and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        # The @phase(...) decorator holds what counts separately (version=, config=,
        # code=, inputs) or not at all (timeout=, retries=): leave it out. Other
        # decorators count as written.
        node.decorator_list = [d for d in node.decorator_list if not _is_phase_decorator(d)]
    return "source:" + tree_digest(node), True


def phase_code_hash(func: Any, named: Sequence[Any] = ()) -> CodeHash:
    """The hash of a phase function's code and of the code named in its ``code=``.

    The order of ``named`` does not count. Each is a module (its whole source), a class or
    a function (its source).
    """
    without_source = []
    own, found = _object_digest(func, phase=True)
    if not found:
        without_source.append(_label(func))
    parts = []
    for obj in named:
        digest, found = _object_digest(obj)
        parts.append(digest)
        if not found:
            without_source.append(_label(obj))
    payload = json.dumps({"phase": own, "named": sorted(parts)}, sort_keys=True)
    return CodeHash(hashlib.sha256(payload.encode()).hexdigest(), tuple(without_source))


def is_code(obj: Any) -> bool:
    """Whether ``code=`` takes this object: a module, a class or a function."""
    return isinstance(obj, types.ModuleType | type | types.FunctionType | types.MethodType)
