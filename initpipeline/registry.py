"""Phases, the DAG they form, and their fingerprints."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from .codehash import CodeHash, is_code, phase_code_hash
from .exceptions import PipelineConfigError

if TYPE_CHECKING:
    from .context import PhaseContext

PhaseFunc = Callable[["PhaseContext"], Any]
F = TypeVar("F", bound=PhaseFunc)

DISCOVER_MODULE = "init_phases"

#: An artifact name: a path segment of letters, digits, "_", "-" and ".", not starting
#: with a dot: it becomes a folder of the storage (storage.py refuses any other).
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}\Z")


#: The longest artifact name (ARTIFACT_NAME), phase name (a shard's record adds "#" and
#: up to 4 digits to it: PhaseRun.name holds 200) and version (PhaseRun.version holds 100).
MAX_NAME = 200
MAX_PHASE_NAME = 195
MAX_VERSION = 100


def part_name(artifact: str, index: int, count: int) -> str:
    """The artifact name a shard's part of ``artifact`` is recorded under."""
    return f"{artifact}.shard-{index:04d}-of-{count:04d}"


def valid_name(name: str) -> bool:
    return bool(ARTIFACT_NAME.match(name)) and ".." not in name


#: The longest timeout a phase may have (seconds): a week. Celery's time limits, the
#: brokers' redelivery timeouts and the PhaseRun.timeout column all need a bound.
MAX_TIMEOUT = 7 * 24 * 3600

#: The most shards a phase may have: each is a task and a record of its own.
MAX_SHARDS = 10_000


@dataclass(frozen=True)
class Phase:
    """One registered phase: a function plus what it produces and what it needs."""

    name: str
    func: PhaseFunc
    produces: tuple[str, ...]
    after: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    version: str = "1"
    timeout: int | None = None
    retries: int = 0
    config: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None
    #: Code outside the function that counts in the fingerprint (``code=``): modules,
    #: classes, functions.
    code: tuple[Any, ...] = ()
    #: How many tasks the phase is split into (``shards=``): a number, or a callable of the
    #: phase's config; None: one task, not sharded.
    shards: int | Callable[[dict[str, Any]], int] | None = None
    #: Publishes the phase's artifacts from its shards' parts; None: shards.merge_default.
    merge: Callable[[PhaseContext], Any] | None = None
    #: The hash of the function's code and of ``code``; computed when the phase is made,
    #: from the source that was just imported (a file changed later on disk does not count).
    code_hash: CodeHash = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        code = (*self.code, self.merge) if self.merge is not None else self.code
        object.__setattr__(self, "code_hash", phase_code_hash(self.func, code))

    @property
    def origin(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"

    def resolved_config(self) -> dict[str, Any]:
        """The phase's config as a plain dict (a callable config is called now)."""
        config = self.config() if callable(self.config) else self.config
        return dict(config or {})

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    def shard_count(self) -> int | None:
        """How many shards the phase has now (``shards=`` resolved); None when not sharded."""
        if self.shards is None:
            return None
        count = self.shards(self.resolved_config()) if callable(self.shards) else self.shards
        if isinstance(count, bool) or not isinstance(count, int):
            raise PipelineConfigError(
                f"shards of phase {self.name!r} must be a whole number, not {count!r}"
            )
        return count


class Fault(StrEnum):
    """The kinds of defect a pipeline can have; checks.py gives each its check id."""

    CYCLE = "cycle"
    UNKNOWN_DEPENDENCY = "unknown dependency"
    PRODUCED_TWICE = "artifact produced twice"
    UNKNOWN_INPUT = "input nobody produces"
    BAD_CONFIG = "config not JSON"
    DUPLICATE_NAME = "phase registered twice"
    PRODUCES_NOTHING = "phase produces nothing"
    BAD_LIMITS = "bad retries or timeout"
    BAD_ARTIFACT_NAME = "artifact name not a safe path segment"
    BAD_SHARDS = "bad shards or merge"
    BAD_PHASE_NAME = "phase name that a shard's record cannot extend"
    PART_NAME_TOO_LONG = "sharded artifact name too long for its parts' names"
    VERSION_TOO_LONG = "version longer than its record holds"


@dataclass(frozen=True)
class Fingerprint:
    """A phase's fingerprint (``value``) and what it is made of (``recipe``)."""

    value: str
    recipe: dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """A defect of the pipeline, reported by the system checks (checks.py)."""

    fault: Fault
    msg: str
    hint: str | None = None
    obj: str | None = None


def _shard_problems(p: Phase) -> list[Problem]:
    hint = f"shards= takes a whole number from 1 to {MAX_SHARDS}, or a callable returning one."
    if p.merge is not None and p.shards is None:
        return [
            Problem(
                Fault.BAD_SHARDS, f"phase {p.name!r} has a merge= but no shards=.", hint, p.name
            )
        ]
    if p.merge is not None and not callable(p.merge):
        return [
            Problem(
                Fault.BAD_SHARDS, f"the merge= of phase {p.name!r} is not callable.", hint, p.name
            )
        ]
    if p.shards is None:
        return []
    try:
        count = p.shard_count()
    except Exception as exc:
        return [
            Problem(
                Fault.BAD_SHARDS,
                f"the shards of phase {p.name!r} cannot be used: {type(exc).__name__}: {exc}",
                hint,
                p.name,
            )
        ]
    if count is None or not 1 <= count <= MAX_SHARDS:
        return [Problem(Fault.BAD_SHARDS, f"phase {p.name!r} has shards={count!r}.", hint, p.name)]
    found = []
    for artifact_name in p.produces:
        longest = part_name(artifact_name, count - 1, count)
        room = MAX_NAME - len(longest) + len(artifact_name)
        if valid_name(artifact_name) and not valid_name(longest):
            found.append(
                Problem(
                    Fault.PART_NAME_TOO_LONG,
                    f"phase {p.name!r} has {count} shards, and its artifact {artifact_name!r} "
                    f"is too long a name for theirs ({longest!r} has {len(longest)} "
                    "characters).",
                    f"A sharded phase's artifact names take at most {room} characters: "
                    "each shard saves its part under the name and a suffix.",
                    p.name,
                )
            )
    return found


def descendants(depends_on: Mapping[str, Iterable[str]], name: str) -> set[str]:
    """Every node that depends on ``name``, directly or not, in a ``{node: dependencies}`` map.

    Used on the code's pipeline (Pipeline.descendants) and on a run's records, whose
    ``depends_on`` says what the run planned.
    """
    found: set[str] = set()
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for other, deps in depends_on.items():
            if current in deps and other not in found:
                found.add(other)
                frontier.append(other)
    return found


def _as_tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass
class Registry:
    """Holds the phases registered with ``@phase``; the global one is ``registry``."""

    _phases: dict[str, Phase] = field(default_factory=dict)
    _duplicates: list[tuple[str, str, str]] = field(default_factory=list)
    _discovered: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pipeline: Pipeline | None = None

    def phase(
        self,
        *,
        produces: str | Sequence[str] | None = None,
        after: str | Sequence[str] = (),
        inputs: str | Sequence[str] = (),
        version: str | int = "1",
        timeout: int | None = None,
        retries: int = 0,
        config: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        code: Sequence[Any] = (),
        shards: int | Callable[[dict[str, Any]], int] | None = None,
        merge: Callable[[PhaseContext], Any] | None = None,
        name: str | None = None,
    ) -> Callable[[F], F]:
        """Register a function as an init phase.

        ::

            @phase(produces="lsa", after=["collect"], version="3", timeout=3600, retries=2)
            def build_index(ctx): ...

        produces   artifact name(s) the phase saves, each exactly once (required)
        after      phase name(s) that must succeed first
        inputs     artifact name(s) it loads; their producers become dependencies
        version    bump it when something outside the code changes (data, a service):
                   the phase and its dependants re-run
        timeout    seconds: Celery soft limit (hard limit 30 s later); default DEFAULT_TIMEOUT
        retries    extra attempts after a failure, with exponential backoff and jitter
        config     dict (or a callable returning one) of JSON values; part of the fingerprint
        code       modules, classes or functions the phase calls whose code must count in
                   its fingerprint too (a module counts whole)
        shards     split the phase into this many tasks (a number, or a callable of the
                   config): each runs the function with ``ctx.shard.index`` and
                   ``ctx.shard.count`` and saves its part of every artifact with the usual
                   ``save_*``; then ``merge`` publishes the artifacts from the parts
        merge      ``merge(ctx)``: read the parts with ``ctx.parts(name)`` (paths) or
                   ``ctx.load_parts(name)`` (values) and save the artifacts; by default JSON
                   lists are concatenated, arrays stacked, bytes and files joined, in shard
                   order
        name       the phase's name; defaults to the function's name

        The fingerprint sees the function's own code, nested functions included, with
        comments, docstrings, formatting and this decorator left out (codehash.py). Code
        it calls elsewhere counts only when named in ``code=``.

        Phases live in an ``init_phases`` module of an installed app and must be safe to run
        twice (a redelivered task may run one again).
        """
        named = tuple(code)
        for obj in named:
            if not is_code(obj):
                raise TypeError(
                    f"@phase(code=...) takes modules, classes and functions, not {obj!r}"
                )

        def decorator(func: F) -> F:
            phase_name = name or func.__name__
            new = Phase(
                name=phase_name,
                func=func,
                produces=_as_tuple(produces),
                after=_as_tuple(after),
                inputs=_as_tuple(inputs),
                version=str(version),
                timeout=timeout,
                retries=retries,
                config=config,
                code=named,
                shards=shards,
                merge=merge,
            )
            old = self._phases.get(phase_name)
            if old is not None and old.origin != new.origin:
                self._duplicates.append((phase_name, old.origin, new.origin))
            self._phases[phase_name] = new
            self._pipeline = None
            return func

        return decorator

    def discover(self) -> None:
        """Import the ``init_phases`` module of every installed app, once."""
        if self._discovered:
            return
        with self._lock:
            if self._discovered:
                return
            from django.utils.module_loading import autodiscover_modules

            try:
                autodiscover_modules(DISCOVER_MODULE)
            except Exception as exc:
                raise PipelineConfigError(
                    f"importing an {DISCOVER_MODULE} module failed: {type(exc).__name__}: {exc}"
                ) from exc
            self._discovered = True

    def pipeline(self) -> Pipeline:
        """The pipeline of every phase registered so far (after discovery); built once."""
        self.discover()
        pipeline = self._pipeline
        if pipeline is None:
            pipeline = Pipeline(list(self._phases.values()), duplicates=list(self._duplicates))
            self._pipeline = pipeline
        return pipeline


registry = Registry()


class Pipeline:
    """A set of phases seen as a DAG: validation, order, fingerprints."""

    def __init__(
        self, phases: Sequence[Phase], *, duplicates: Sequence[tuple[str, str, str]] = ()
    ) -> None:
        self.phases: dict[str, Phase] = {p.name: p for p in phases}
        self._duplicates = list(duplicates)
        self._order: list[str] | None = None
        self.producer: dict[str, str] = {}
        for p in phases:
            for artifact_name in p.produces:
                self.producer.setdefault(artifact_name, p.name)

    def __contains__(self, name: object) -> bool:
        return name in self.phases

    def __getitem__(self, name: str) -> Phase:
        try:
            return self.phases[name]
        except KeyError:
            known = ", ".join(sorted(self.phases)) or "none registered"
            raise PipelineConfigError(f"unknown phase {name!r} (known: {known})") from None

    def dependencies(self, name: str) -> list[str]:
        """Direct upstream phases: ``after`` plus the producers of ``inputs``."""
        p = self.phases[name]
        deps = list(p.after)
        for artifact_name in p.inputs:
            producer = self.producer.get(artifact_name)
            if producer is not None and producer not in deps:
                deps.append(producer)
        return deps

    def problems(self) -> list[Problem]:
        """Everything wrong with the DAG; empty when it can run."""
        found: list[Problem] = []
        for phase_name, first, second in self._duplicates:
            found.append(
                Problem(
                    Fault.DUPLICATE_NAME,
                    f"phase {phase_name!r} is registered twice: by {first} and by {second}.",
                    "Give one of them another name with @phase(name=...).",
                    phase_name,
                )
            )
        owners: dict[str, list[str]] = {}
        for p in self.phases.values():
            if not p.produces:
                found.append(
                    Problem(
                        Fault.PRODUCES_NOTHING,
                        f"phase {p.name!r} produces no artifact.",
                        "Every phase needs produces=...: its artifacts are what makes it "
                        "cacheable and what the site serves.",
                        p.name,
                    )
                )
            if "#" in p.name or not 0 < len(p.name) <= MAX_PHASE_NAME:
                found.append(
                    Problem(
                        Fault.BAD_PHASE_NAME,
                        f"phase {p.name[:60]!r} has a name that is empty, longer than "
                        f"{MAX_PHASE_NAME} characters or holds '#'.",
                        "A sharded phase's shards are recorded as '<phase>#<index>': a "
                        "phase name holds no '#' and leaves room for the index.",
                        p.name,
                    )
                )
            if len(p.version) > MAX_VERSION:
                found.append(
                    Problem(
                        Fault.VERSION_TOO_LONG,
                        f"phase {p.name!r} has a version of {len(p.version)} characters; its "
                        f"record holds {MAX_VERSION}.",
                        'A version is a short label ("3", "2024-05-lsa"): bump it when the '
                        "phase's output must change.",
                        p.name,
                    )
                )
            if p.retries < 0 or (p.timeout is not None and not 0 < p.timeout <= MAX_TIMEOUT):
                found.append(
                    Problem(
                        Fault.BAD_LIMITS,
                        f"phase {p.name!r} has retries={p.retries!r}, timeout={p.timeout!r}.",
                        "retries must be >= 0 and timeout a number of seconds from 1 to "
                        f"{MAX_TIMEOUT} (a week).",
                        p.name,
                    )
                )
            for artifact_name in p.produces:
                owners.setdefault(artifact_name, []).append(p.name)
                if not valid_name(artifact_name) or artifact_name.startswith("_initpipeline"):
                    found.append(
                        Problem(
                            Fault.BAD_ARTIFACT_NAME,
                            f"phase {p.name!r} produces {artifact_name!r}, which is not a "
                            "valid artifact name.",
                            "An artifact name is a folder of the storage: letters, digits, "
                            "'_', '-' and '.', not starting with '.' or '_initpipeline' (its "
                            "own folders), no '..', at most 200.",
                            p.name,
                        )
                    )
            for dep in p.after:
                if dep not in self.phases:
                    found.append(
                        Problem(
                            Fault.UNKNOWN_DEPENDENCY,
                            f"phase {p.name!r} runs after {dep!r}, which is not a phase.",
                            f"Known phases: {', '.join(sorted(self.phases))}.",
                            p.name,
                        )
                    )
            for artifact_name in p.inputs:
                if artifact_name not in self.producer:
                    found.append(
                        Problem(
                            Fault.UNKNOWN_INPUT,
                            f"phase {p.name!r} reads artifact {artifact_name!r}, "
                            "which no phase produces.",
                            "Add a phase with produces=... for it, or fix the name.",
                            p.name,
                        )
                    )
        for p in self.phases.values():
            found.extend(_shard_problems(p))
        for artifact_name, names in sorted(owners.items()):
            if len(names) > 1:
                found.append(
                    Problem(
                        Fault.PRODUCED_TWICE,
                        f"artifact {artifact_name!r} is produced by more than one phase: "
                        f"{', '.join(names)}.",
                        "An artifact has exactly one producer; rename one of them.",
                        artifact_name,
                    )
                )
        cycle = self._find_cycle()
        if cycle:
            found.append(
                Problem(
                    Fault.CYCLE,
                    f"the phases form a cycle: {' -> '.join(cycle)}.",
                    "Remove one of these dependencies.",
                    cycle[0],
                )
            )
        for p in self.phases.values():
            try:
                _canonical(p.resolved_config())
            except Exception as exc:
                found.append(
                    Problem(
                        Fault.BAD_CONFIG,
                        f"the config of phase {p.name!r} cannot be used: "
                        f"{type(exc).__name__}: {exc}",
                        "config must be (or return) a dict of JSON values.",
                        p.name,
                    )
                )
        return found

    def _known_deps(self, name: str) -> list[str]:
        return [d for d in self.dependencies(name) if d in self.phases]

    def _find_cycle(self) -> list[str]:
        white, grey, black = 0, 1, 2
        colour = dict.fromkeys(self.phases, white)
        stack: list[str] = []

        def visit(node: str) -> list[str]:
            colour[node] = grey
            stack.append(node)
            for dep in self._known_deps(node):
                if colour[dep] == grey:
                    return [*stack[stack.index(dep) :], dep]
                if colour[dep] == white:
                    found = visit(dep)
                    if found:
                        return found
            stack.pop()
            colour[node] = black
            return []

        for node in self.phases:
            if colour[node] == white:
                found = visit(node)
                if found:
                    # Dependencies point upstream; print the cycle in running order.
                    return list(reversed(found))
        return []

    def order(self) -> list[str]:
        """Phases in running order: every phase after its dependencies, ties by registration.

        Raises PipelineConfigError for a cycle. Computed once: the structure of a pipeline
        never changes (configs may, and fingerprints() reads them every time).
        """
        if self._order is None:
            cycle = self._find_cycle()
            if cycle:
                raise PipelineConfigError(f"the phases form a cycle: {' -> '.join(cycle)}.")
            self._order = self._topological()
        return list(self._order)

    def _topological(self) -> list[str]:
        done: list[str] = []
        placed: set[str] = set()
        remaining = list(self.phases)
        while remaining:
            for name in remaining:
                if all(d in placed for d in self._known_deps(name)):
                    done.append(name)
                    placed.add(name)
                    remaining.remove(name)
                    break
        return done

    def descendants(self, name: str) -> set[str]:
        """Every phase that depends on ``name``, directly or not."""
        self[name]
        return descendants({other: self._known_deps(other) for other in self.phases}, name)

    def ancestors(self, name: str) -> set[str]:
        """Every phase ``name`` depends on, directly or not."""
        found: set[str] = set()
        frontier = [name]
        while frontier:
            for dep in self._known_deps(frontier.pop()):
                if dep not in found:
                    found.add(dep)
                    frontier.append(dep)
        return found

    def fingerprints(self) -> dict[str, str]:
        """Each phase's fingerprint (see ``fingerprint_recipes``)."""
        return {name: fp.value for name, fp in self.fingerprint_recipes().items()}

    def fingerprint_recipes(self) -> dict[str, Fingerprint]:
        """Each phase's fingerprint and what it is made of, in running order.

        The fingerprint is the sha256 of the phase's name and its recipe: its code (with
        the code named in ``code=``), ``version``, config, the artifacts it produces and
        its inputs' fingerprints. The recipe is kept on each PhaseRun, so that a plan can
        say which part changed.
        """
        result: dict[str, Fingerprint] = {}
        for name in self.order():
            p = self.phases[name]
            recipe: dict[str, Any] = {
                "code": p.code_hash.sha256,
                "version": p.version,
                "config": hashlib.sha256(_canonical(p.resolved_config()).encode()).hexdigest(),
                "produces": list(p.produces),
                "inputs": {dep: result[dep].value for dep in sorted(self._known_deps(name))},
            }
            if p.sharded:
                # How the work is split shapes the parts, and the parts are cached.
                recipe["shards"] = p.shard_count()
            value = hashlib.sha256(_canonical({"phase": name, **recipe}).encode()).hexdigest()
            result[name] = Fingerprint(value, recipe)
        return result

    def legacy_fingerprints(self) -> dict[str, str]:
        """The fingerprints as initpipeline computed them before code counted in them.

        Artifacts recorded under these were built before the upgrade; planning.py adopts
        them once instead of rebuilding everything (README: Upgrading). Never change this
        recipe: it must give exactly what the old versions recorded.
        """
        result: dict[str, str] = {}
        for name in self.order():
            p = self.phases[name]
            payload = {
                "phase": name,
                "version": p.version,
                "config": p.resolved_config(),
                "produces": list(p.produces),
                "inputs": {dep: result[dep] for dep in sorted(self._known_deps(name))},
            }
            result[name] = hashlib.sha256(_canonical(payload).encode()).hexdigest()
        return result

    def artifact_names(self) -> list[str]:
        return [a for name in self.order() for a in self.phases[name].produces]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def get_pipeline() -> Pipeline:
    """The project's pipeline: every ``@phase`` in every installed app's ``init_phases``."""
    return registry.pipeline()


def required_artifacts() -> list[str]:
    """What readiness waits for: ``REQUIRED_ARTIFACTS``, or every artifact of the pipeline."""
    # Not at the top: this module is imported without Django too (the fingerprints of
    # phases, computed by other Pythons in tests/test_codehash.py).
    from .conf import settings

    return list(settings.REQUIRED_ARTIFACTS or get_pipeline().artifact_names())
