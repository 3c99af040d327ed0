"""What a start runs and why: the plan that ``start_init --dry-run`` prints and start() follows.

Each phase is ``cached`` when an artifact recorded under its fingerprint verifies, else it
runs. The reason says why, decided against the records of the phase in the active
generation (or, for a phase that has none, its latest build):

    never built, code changed, version changed, config changed, produces changed,
    shards changed,
    input changed: NAMES, artifact missing, artifact corrupt, artifact unreadable, forced,
    built before code fingerprints (a phase whose old fingerprint matches, past adoption),
    fingerprint changed (none of the recorded parts differ: a recipe of another version)

and for a cached phase: ``unchanged``, ``built by run N`` (a resumed or rolled-back
phase), or ``adopted (built before code fingerprints)`` (see
``Pipeline.legacy_fingerprints``). Several reasons are joined with "; ". Planning writes
no record and sends nothing, so it runs before any worker starts and without a broker.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .models import Artifact, Generation, PhaseRun
from .registry import Pipeline

RUN = "run"
CACHED = "cached"

NEVER_BUILT = "never built"
CODE_CHANGED = "code changed"
VERSION_CHANGED = "version changed"
CONFIG_CHANGED = "config changed"
PRODUCES_CHANGED = "produces changed"
SHARDS_CHANGED = "shards changed"
INPUT_CHANGED = "input changed"
FINGERPRINT_CHANGED = "fingerprint changed"
ARTIFACT_MISSING = "artifact missing"
ARTIFACT_CORRUPT = "artifact corrupt"
ARTIFACT_UNREADABLE = "artifact unreadable"
FORCED = "forced"
UNCHANGED = "unchanged"
ADOPTED = "adopted (built before code fingerprints)"
#: A phase whose old fingerprint still matches, but that can no longer be adopted.
BUILT_BEFORE_CODE = "built before code fingerprints"


@dataclass(frozen=True)
class PlannedPhase:
    """One phase of a plan: ``action`` is run or cached."""

    name: str
    action: str
    reason: str
    fingerprint: str
    recipe: dict[str, Any]
    #: Records under the phase's old fingerprint that the run records under the new one.
    adopt: tuple[Artifact, ...] = field(default=(), repr=False)

    @property
    def cached(self) -> bool:
        return self.action == CACHED

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "action": self.action, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """What a start would do: ``up_to_date`` when the active generation already serves it."""

    phases: list[PlannedPhase]
    up_to_date: bool
    active: Generation | None

    @property
    def to_run(self) -> list[str]:
        return [p.name for p in self.phases if not p.cached]

    def as_dict(self) -> dict[str, Any]:
        """``start_init --dry-run --json``."""
        return {"phases": [p.as_dict() for p in self.phases], "up_to_date": self.up_to_date}


class _Checks:
    """Verifies each artifact record once per plan (verifying hashes the whole file)."""

    def __init__(self) -> None:
        self.found: dict[int, str | None] = {}

    def problem(self, record: Artifact) -> str | None:
        if record.pk not in self.found:
            self.found[record.pk] = _problem(record)
        return self.found[record.pk]

    def first_problem(self, records: list[Artifact]) -> str | None:
        return next((p for p in map(self.problem, records) if p is not None), None)


def _problem(record: Artifact) -> str | None:
    # Cheap once a host verified the file; a remote one is not downloaded for a plan.
    return {
        None: None,
        storage.MISSING: ARTIFACT_MISSING,
        storage.CORRUPT: ARTIFACT_CORRUPT,
        storage.UNREADABLE: ARTIFACT_UNREADABLE,
    }[storage.assess(record)]


def _records(produces: Collection[str], fingerprint: str) -> list[Artifact] | None:
    """The latest record of each artifact under ``fingerprint``; None unless all exist."""
    records = []
    for name in produces:
        record = Artifact.objects.for_fingerprint(name, fingerprint).first()
        if record is None:
            return None
        records.append(record)
    return records


@dataclass(frozen=True)
class _Reference:
    """The record a phase is compared with: the PhaseRun that made what serves, and the
    fingerprints of the other phases of its run (for runs planned before recipes)."""

    phase_run: PhaseRun
    run_fingerprints: Mapping[str, str]


def _references(pipeline: Pipeline, active: Generation | None) -> dict[str, _Reference]:
    found: dict[str, _Reference] = {}
    if active is not None:
        rows = {pr.name: pr for pr in active.run.phases.all()}
        for name, pr in rows.items():
            if name in pipeline and active.fingerprints.get(name) == pr.fingerprint:
                found[name] = _Reference(pr, active.fingerprints)
    for name in pipeline.order():
        if name in found:
            continue
        latest = (
            Artifact.objects.filter(phase_run__name=name)
            .select_related("phase_run")
            .order_by("-created_at", "-id")
            .first()
        )
        if latest is not None and latest.phase_run is not None:
            built = latest.phase_run
            fingerprints = dict(
                PhaseRun.objects.filter(run_id=built.run_id).values_list("name", "fingerprint")
            )
            found[name] = _Reference(built, fingerprints)
    return found


def _changes(
    name: str,
    recipe: Mapping[str, Any],
    reference: _Reference | None,
    pipeline: Pipeline,
    legacy: Mapping[str, str],
) -> str:
    """Why a phase with no usable artifact under its fingerprint runs."""
    if reference is None:
        return NEVER_BUILT
    old = reference.phase_run.recipe
    parts: list[str] = []
    if "code" in old:
        for key, reason in (
            ("code", CODE_CHANGED),
            ("version", VERSION_CHANGED),
            ("config", CONFIG_CHANGED),
            ("produces", PRODUCES_CHANGED),
            ("shards", SHARDS_CHANGED),
        ):
            if old.get(key) != recipe.get(key):
                parts.append(reason)
        before, now = old.get("inputs", {}), recipe["inputs"]
        names = [n for n in pipeline.order() if n in before or n in now]
        names += sorted(set(before) - set(pipeline.phases))  # inputs that are phases no more
        changed = [n for n in names if before.get(n) != now.get(n)]
    else:
        # Planned before fingerprints saw code: compare what the old recipe held.
        if legacy[name] == reference.phase_run.fingerprint:
            return BUILT_BEFORE_CODE
        if reference.phase_run.version != pipeline[name].version:
            parts.append(VERSION_CHANGED)
        deps = sorted(recipe["inputs"])
        changed = [d for d in deps if reference.run_fingerprints.get(d) != legacy[d]]
        if not parts and not changed:
            # Name, version and inputs are the same: the config (or, rarely, the
            # artifacts' names) is what changed.
            parts.append(CONFIG_CHANGED)
    if changed:
        parts.append(f"{INPUT_CHANGED}: {', '.join(changed)}")
    return "; ".join(parts) or FINGERPRINT_CHANGED


def _adoptable(name: str, produces: Collection[str], legacy: str) -> list[Artifact] | None:
    """The records under the phase's pre-upgrade fingerprint, if it may adopt them.

    Only until the phase is first planned with a recipe: after that, the old fingerprint
    (which does not see code) must not stand in for the new one, or a later code edit
    would adopt the old artifact again.
    """
    if PhaseRun.objects.filter(name=name, recipe__has_key="code").exists():
        return None
    return _records(produces, legacy)


def _decide(
    name: str,
    fingerprint: str,
    recipe: Mapping[str, Any],
    reference: _Reference | None,
    pipeline: Pipeline,
    legacy: Mapping[str, str],
    checks: _Checks,
) -> tuple[str, str, tuple[Artifact, ...]]:
    """(action, reason, records to adopt) of a phase that is not forced."""
    produces = pipeline[name].produces
    records = _records(produces, fingerprint)
    if records is not None:
        problem = checks.first_problem(records)
        if problem is not None:
            return RUN, problem, ()
        if reference is not None and reference.phase_run.fingerprint == fingerprint:
            return CACHED, UNCHANGED, ()
        built_by = records[0].run_id
        return CACHED, f"built by run {built_by}" if built_by else UNCHANGED, ()
    old = _adoptable(name, produces, legacy[name])
    if old is not None:
        problem = checks.first_problem(old)
        if problem is not None:
            return RUN, problem, ()
        return CACHED, ADOPTED, tuple(old)
    return RUN, _changes(name, recipe, reference, pipeline, legacy), ()


def make_plan(pipeline: Pipeline, *, forced: Collection[str] = ()) -> Plan:
    """The plan for ``pipeline`` against the records: which phases run, and why.

    ``forced``: phases that run whatever their records say (``--force``, ``--from``,
    ``--only``). Verifies the artifacts it counts on (their files are hashed): call it
    outside any transaction.
    """
    fingerprints = pipeline.fingerprint_recipes()
    legacy = pipeline.legacy_fingerprints()
    active = Generation.objects.active()
    references = _references(pipeline, active)
    checks = _Checks()
    phases: list[PlannedPhase] = []
    for name, fp in fingerprints.items():
        adopt: tuple[Artifact, ...] = ()
        if name in forced:
            action, reason = RUN, FORCED
        else:
            action, reason, adopt = _decide(
                name, fp.value, fp.recipe, references.get(name), pipeline, legacy, checks
            )
        phases.append(PlannedPhase(name, action, reason, fp.value, fp.recipe, adopt))

    up_to_date = (
        not forced
        and active is not None
        and active.fingerprints == {p.name: p.fingerprint for p in phases}
        and all(p.reason == UNCHANGED for p in phases)
        and all(checks.problem(a) is None for a in active.artifacts.all())
    )
    return Plan(phases, up_to_date, active)
