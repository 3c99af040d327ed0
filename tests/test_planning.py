"""What a start runs and why: code edits, configs, broken artifacts, resumes and the upgrade.

Each test loads versions of tests/codeapp/source.py's pipeline x -> y -> z in this process,
deploys them for real (start(), then each phase through execution.py, as a worker would)
and reads the plan as ``start_init --dry-run`` prints it. tests/test_planning_integration.py
does the same through worker subprocesses.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from initpipeline import execution, outcomes, services
from initpipeline import registry as registry_module
from initpipeline.exceptions import PhaseFailed
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun
from initpipeline.planning import ADOPTED
from initpipeline.registry import Pipeline
from tests.codeapp.source import OWN_REGISTRY, PHASES, SCALING, edit, load
from tests.records import Sent

pytestmark = pytest.mark.usefixtures("transactional_db", "sent")

_counter = itertools.count()

Use = Callable[..., Pipeline]


@pytest.fixture
def use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Use:
    """Load a version of the pipeline's source (and of y's scaling module) as the project's."""

    def load_version(source: str = PHASES, scaling: str = SCALING) -> Pipeline:
        n = next(_counter)
        scaling_name = f"planning_scaling_{n}"
        (tmp_path / f"{scaling_name}.py").write_text(scaling)
        load(tmp_path / f"{scaling_name}.py", scaling_name)
        path = tmp_path / f"planning_phases_{n}.py"
        path.write_text(source.format(header=OWN_REGISTRY, scaling=scaling_name))
        module = load(path, f"planning_phases_{n}")
        module.registry._discovered = True
        monkeypatch.setattr(registry_module, "registry", module.registry)
        return registry_module.get_pipeline()

    return load_version


def deploy() -> PipelineRun | None:
    """start(), then run each phase it sent as a worker would; the run, if one started."""
    result = services.start(trigger="test")
    if result.outcome != services.ENQUEUED:
        return None
    run = result.run
    assert run is not None
    for pr in run.phases.filter(state="pending").order_by("position"):
        execution.execute_phase(run_id=run.pk, phase_name=pr.name)
    outcomes.finish_run(run_id=run.pk)
    run.refresh_from_db()
    return run


def dry_run(*args: str) -> str:
    out = io.StringIO()
    call_command("start_init", "--dry-run", *args, stdout=out)
    return out.getvalue()


def states(run: PipelineRun) -> dict[str, tuple[str, str]]:
    return {pr.name: (pr.state, pr.reason) for pr in run.phases.order_by("position")}


def active_value(name: str) -> object:
    from initpipeline import formats, storage

    record = Generation.objects.get(is_active=True).artifact_map()[name]
    return formats.read(storage.verify(record), record.format)


ALL_UNCHANGED = (
    "x  cached  unchanged\ny  cached  unchanged\nz  cached  unchanged\n"
    "up to date: generation {gen} is active\n"
)


def up_to_date() -> str:
    return ALL_UNCHANGED.format(gen=Generation.objects.get(is_active=True).pk)


# -- before the first run -------------------------------------------------------------------


def test_dry_run_before_any_run_plans_every_phase_and_creates_nothing(use: Use, sent: Sent) -> None:
    use()
    assert dry_run() == (
        "x  run  never built\ny  run  never built\nz  run  never built\n3 of 3 phases to run\n"
    )
    assert json.loads(dry_run("--json")) == {
        "phases": [
            {"name": "x", "action": "run", "reason": "never built"},
            {"name": "y", "action": "run", "reason": "never built"},
            {"name": "z", "action": "run", "reason": "never built"},
        ],
        "up_to_date": False,
    }
    assert not PipelineRun.objects.exists()
    assert sent == []


def test_dry_run_json_is_exactly_the_plan(use: Use) -> None:
    use()
    deploy()
    out = dry_run("--json")
    assert out == (
        "{\n"
        '  "phases": [\n'
        "    {\n"
        '      "name": "x",\n'
        '      "action": "cached",\n'
        '      "reason": "unchanged"\n'
        "    },\n"
        "    {\n"
        '      "name": "y",\n'
        '      "action": "cached",\n'
        '      "reason": "unchanged"\n'
        "    },\n"
        "    {\n"
        '      "name": "z",\n'
        '      "action": "cached",\n'
        '      "reason": "unchanged"\n'
        "    }\n"
        "  ],\n"
        '  "up_to_date": true\n'
        "}\n"
    )


# -- code edits -------------------------------------------------------------------------------


def test_code_edit_without_version_bump_reruns_the_phase_and_its_dependants(use: Use) -> None:
    use()
    first = deploy()
    assert first is not None
    assert states(first) == {
        "x": ("succeeded", "never built"),
        "y": ("succeeded", "never built"),
        "z": ("succeeded", "never built"),
    }
    assert dry_run() == up_to_date()

    use(edit(PHASES, "scaling.scale(n) for", "scaling.scale(n) + 1 for"))
    assert dry_run() == (
        "x  cached  unchanged\n"
        "y  run     code changed\n"
        "z  run     input changed: y\n"
        "2 of 3 phases to run\n"
    )
    assert json.loads(dry_run("--json")) == {
        "phases": [
            {"name": "x", "action": "cached", "reason": "unchanged"},
            {"name": "y", "action": "run", "reason": "code changed"},
            {"name": "z", "action": "run", "reason": "input changed: y"},
        ],
        "up_to_date": False,
    }
    assert PipelineRun.objects.count() == 1

    second = deploy()
    assert second is not None
    assert states(second) == {
        "x": ("cached", "unchanged"),
        "y": ("succeeded", "code changed"),
        "z": ("succeeded", "input changed: y"),
    }
    assert active_value("z_out") == {"total": 16}  # (0 + 1 + 2 + 3) * 2 + 4
    assert dry_run() == up_to_date()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("    # Scale each number.\n", "    # Scale them all.\n", id="comment"),
        pytest.param('"""The numbers, scaled."""', '"""Each number times two."""', id="docstring"),
        pytest.param(
            '"""Three phases: x makes numbers, y scales them, z adds them up."""',
            '"""x -> y -> z."""',
            id="module docstring",
        ),
        pytest.param(
            '    ctx.save_json("z_out", {{"total": sum(ctx.load("y_out"))}})\n',
            '    """Add them up."""\n\n    ctx.save_json(\n        "z_out",\n'
            '        {{"total": sum(ctx.load("y_out"))}},  # the sum\n    )\n',
            id="new docstring and formatting",
        ),
        pytest.param("timeout=60", "timeout=90, retries=2", id="timeout and retries"),
    ],
)
def test_edits_that_cannot_change_a_result_keep_everything_cached(
    use: Use, old: str, new: str
) -> None:
    use()
    deploy()
    use(edit(PHASES, old, new))
    assert dry_run() == up_to_date()
    assert services.start().outcome == services.UP_TO_DATE


def test_edited_module_named_in_code_reruns_its_phase(use: Use) -> None:
    use()
    deploy()
    use(scaling=edit(SCALING, "n * 2", "n * 3"))
    assert dry_run() == (
        "x  cached  unchanged\n"
        "y  run     code changed\n"
        "z  run     input changed: y\n"
        "2 of 3 phases to run\n"
    )
    run = deploy()
    assert run is not None
    assert [name for name, (state, _) in states(run).items() if state == "succeeded"] == ["y", "z"]
    assert active_value("y_out") == [0, 3, 6, 9]
    # A comment or a docstring in that module does not count either.
    use(scaling=edit(edit(SCALING, "n * 2", "n * 3"), '"""How y scales."""', "# y's scaling"))
    assert dry_run() == up_to_date()


def test_module_not_named_in_code_does_not_count(use: Use) -> None:
    use()
    deploy()
    # What code= is for: without it, y's fingerprint does not see the module it calls.
    use(edit(PHASES, ", code=[scaling]", ""))
    deploy()
    use(edit(PHASES, ", code=[scaling]", ""), scaling=edit(SCALING, "n * 2", "n * 3"))
    assert dry_run() == up_to_date()


# -- version, config and forced runs ---------------------------------------------------------


def test_config_edit_says_config_changed(use: Use) -> None:
    use()
    deploy()
    use(edit(PHASES, '{{"n": 4}}', '{{"n": 5}}'))
    assert dry_run() == (
        "x  run  config changed\n"
        "y  run  input changed: x\n"
        "z  run  input changed: y\n"
        "3 of 3 phases to run\n"
    )


def test_version_bump_and_code_edit_both_show(use: Use) -> None:
    use()
    deploy()
    source = edit(PHASES, 'inputs=["x_out"], timeout=60', 'inputs=["x_out"], version="2"')
    use(edit(source, "# Scale each number.\n", "numbers = numbers[:2]\n"))
    assert dry_run().splitlines()[1] == "y  run     code changed; version changed"


def test_forced_phases_say_forced(use: Use) -> None:
    use()
    deploy()
    assert dry_run("--from", "y") == (
        "x  cached  unchanged\ny  run     forced\nz  run     forced\n2 of 3 phases to run\n"
    )
    assert dry_run("--force").splitlines()[-1] == "3 of 3 phases to run"


def test_dry_run_of_an_unknown_phase_is_bad_usage(use: Use) -> None:
    use()
    with pytest.raises(CommandError) as exc:
        dry_run("--only", "nosuch")
    assert (str(exc.value), exc.value.returncode) == (
        "unknown phase 'nosuch' (known: x, y, z)",
        2,
    )
    with pytest.raises(CommandError) as exc:
        dry_run("--wait")
    assert (str(exc.value), exc.value.returncode) == ("--dry-run starts nothing to --wait for", 2)
    # An empty --from (an unset shell variable) is a mistake, not "from nowhere".
    with pytest.raises(CommandError) as exc:
        dry_run("--from", "")
    assert (str(exc.value), exc.value.returncode) == ("unknown phase '' (known: x, y, z)", 2)


def test_dry_run_on_a_database_that_lacks_migrations_is_bad_usage(
    use: Use, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db.migrations import Migration
    from django.db.migrations.executor import MigrationExecutor

    use()
    missing = [(Migration("0099_next", "initpipeline"), False)]
    monkeypatch.setattr(MigrationExecutor, "migration_plan", lambda self, targets: missing)
    with pytest.raises(CommandError) as exc:
        dry_run()
    assert (str(exc.value), exc.value.returncode) == (
        "the database lacks migrations initpipeline.0099_next: run `manage.py migrate` first",
        2,
    )


# -- broken artifacts, resumes, runs in flight ---------------------------------------------


def _file(name: str, artifacts_dir: Path) -> Path:
    record = Generation.objects.get(is_active=True).artifact_map()[name]
    path = artifacts_dir / record.storage_key
    os.chmod(path, 0o644)
    return path


def test_corrupt_artifact_is_rebuilt_alone(use: Use, artifacts_dir: Path) -> None:
    use()
    deploy()
    path = _file("y_out", artifacts_dir)
    path.write_bytes(path.read_bytes().replace(b"2", b"7"))
    assert dry_run() == (
        "x  cached  unchanged\n"
        "y  run     artifact corrupt\n"
        "z  cached  unchanged\n"
        "1 of 3 phases to run\n"
    )
    run = deploy()
    assert run is not None
    assert states(run)["y"] == ("succeeded", "artifact corrupt")
    assert dry_run() == up_to_date()


def test_missing_artifact_is_rebuilt(use: Use, artifacts_dir: Path) -> None:
    use()
    deploy()
    _file("x_out", artifacts_dir).unlink()
    assert dry_run().splitlines()[0] == "x  run     artifact missing"


def test_phases_done_by_a_failed_run_are_cached_as_built_by_it(use: Use) -> None:
    use()
    deploy()
    y_edited = edit(PHASES, "# Scale each number.\n", "numbers = numbers[::-1]\n")
    z_fails = 'raise RuntimeError("z fails")\n    ctx.save_json("z_out"'
    use(edit(y_edited, 'ctx.save_json("z_out"', z_fails))
    with pytest.raises(PhaseFailed, match="z fails"):
        deploy()
    failed = PipelineRun.objects.latest_first().first()
    assert failed is not None and failed.state == "failed"
    use(y_edited)
    # z is compared with the active generation's z: its own code is the same again.
    assert dry_run() == (
        "x  cached  unchanged\n"
        f"y  cached  built by run {failed.pk}\n"
        "z  run     input changed: y\n"
        "1 of 3 phases to run\n"
    )


def test_dry_run_names_the_run_in_flight(use: Use) -> None:
    use()
    result = services.start(trigger="test")  # sent nowhere: stays pending
    assert result.run is not None
    assert dry_run().splitlines()[-1] == (
        f"3 of 3 phases to run; run {result.run.pk} is in flight, so start_init would attach to it"
    )


def test_every_phase_cached_but_not_active_needs_a_run_and_no_worker(use: Use) -> None:
    use()
    deploy()
    first = Generation.objects.get(is_active=True)
    use(edit(PHASES, '{{"n": 4}}', '{{"n": 5}}'))
    deploy()
    use()  # back to the first version: a rollback
    assert dry_run() == (
        f"x  cached  built by run {first.run_id}\n"
        f"y  cached  built by run {first.run_id}\n"
        f"z  cached  built by run {first.run_id}\n"
        "nothing to run: a run would activate the cached artifacts\n"
    )
    run = deploy()
    assert run is not None and run.state == "succeeded"
    assert Generation.objects.get(is_active=True).run_id == run.pk
    assert dry_run() == up_to_date()


# -- upgrading from fingerprints without code -----------------------------------------------


def downgrade_records(pipeline: Pipeline) -> None:
    """Rewrite the records as initpipeline wrote them before code counted in fingerprints:
    legacy fingerprints, no recipes, no reasons."""
    legacy = pipeline.legacy_fingerprints()
    for name, fingerprint in pipeline.fingerprints().items():
        PhaseRun.objects.filter(fingerprint=fingerprint).update(
            fingerprint=legacy[name], recipe={}, reason=""
        )
        Artifact.objects.filter(fingerprint=fingerprint).update(fingerprint=legacy[name])
    Generation.objects.update(fingerprints=legacy)


def test_upgrade_adopts_the_artifacts_built_before_code_fingerprints(use: Use) -> None:
    pipeline = use()
    deploy()
    downgrade_records(pipeline)
    before = Generation.objects.get(is_active=True)
    adopted = f"cached  {ADOPTED}"
    assert dry_run() == (
        f"x  {adopted}\ny  {adopted}\nz  {adopted}\n"
        "nothing to run: a run would activate the cached artifacts\n"
    )
    run = deploy()
    assert run is not None and run.state == "succeeded"
    assert states(run) == dict.fromkeys("xyz", ("cached", ADOPTED))
    after = Generation.objects.get(is_active=True)
    assert after.run_id == run.pk
    assert after.fingerprints == pipeline.fingerprints()
    # The same files, recorded under the new fingerprints; the builder stays on record.
    old, new = before.artifact_map(), after.artifact_map()
    for name in ("x_out", "y_out", "z_out"):
        assert new[name].storage_key == old[name].storage_key
        assert new[name].run_id == before.run_id
        assert new[name].metadata["adopted_from"] == old[name].pk
    assert dry_run() == up_to_date()

    # Adopted once: a code edit after the upgrade is seen like any other.
    use(edit(PHASES, "# Scale each number.\n", "numbers = numbers[1:]\n"))
    assert dry_run().splitlines()[1:3] == ["y  run     code changed", "z  run     input changed: y"]


@pytest.mark.parametrize(
    ("old", "new", "plan"),
    [
        pytest.param(
            'inputs=["x_out"], timeout=60',
            'inputs=["x_out"], version="2"',
            [f"x  cached  {ADOPTED}", "y  run     version changed", "z  run     input changed: y"],
            id="version",
        ),
        pytest.param(
            '{{"n": 4}}',
            '{{"n": 5}}',
            ["x  run  config changed", "y  run  input changed: x", "z  run  input changed: y"],
            id="config",
        ),
    ],
)
def test_upgrade_with_a_change_adopts_only_what_the_old_fingerprints_still_match(
    use: Use, old: str, new: str, plan: list[str]
) -> None:
    pipeline = use()
    deploy()
    downgrade_records(pipeline)
    use(edit(PHASES, old, new))
    assert dry_run().splitlines()[:3] == plan


def test_corrupt_artifact_built_before_the_upgrade_is_rebuilt(
    use: Use, artifacts_dir: Path
) -> None:
    pipeline = use()
    deploy()
    downgrade_records(pipeline)
    path = _file("z_out", artifacts_dir)
    path.write_bytes(path.read_bytes()[:-1])
    assert dry_run().splitlines()[2] == "z  run     artifact corrupt"
