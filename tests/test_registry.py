from __future__ import annotations

from typing import Any

import pytest
from django.core import checks

from initpipeline import registry as registry_module
from initpipeline.checks import PIPELINE_IDS, validate_pipeline
from initpipeline.exceptions import PipelineConfigError
from initpipeline.registry import Pipeline, Registry


def noop(ctx: Any) -> None:
    pass


def make(*specs: dict[str, Any]) -> Pipeline:
    reg = Registry()
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name")
        reg.phase(name=name, **spec)(noop)
    reg._discovered = True
    return reg.pipeline()


def ids(pipeline: Pipeline) -> list[str]:
    """The check ids (checks.py) of the pipeline's problems."""
    return [PIPELINE_IDS[p.fault] for p in pipeline.problems()]


LINEAR = (
    {"name": "a", "produces": "x"},
    {"name": "b", "produces": "y", "after": "a"},
    {"name": "c", "produces": "z", "inputs": ["y"]},
)


def test_order_puts_every_phase_after_its_dependencies() -> None:
    pipeline = make(*reversed(LINEAR))
    assert pipeline.order() == ["a", "b", "c"]
    assert pipeline.problems() == []


def test_order_keeps_registration_order_between_independent_phases() -> None:
    pipeline = make({"name": "z", "produces": "1"}, {"name": "m", "produces": "2"})
    assert pipeline.order() == ["z", "m"]


def test_inputs_make_their_producer_a_dependency() -> None:
    pipeline = make(*LINEAR)
    assert pipeline.dependencies("c") == ["b"]
    assert pipeline.ancestors("c") == {"a", "b"}
    assert pipeline.descendants("a") == {"b", "c"}


def test_cycle_is_reported_in_running_order() -> None:
    pipeline = make(
        {"name": "a", "produces": "x", "after": "c"},
        {"name": "b", "produces": "y", "after": "a"},
        {"name": "c", "produces": "z", "after": "b"},
    )
    problems = pipeline.problems()
    assert [PIPELINE_IDS[p.fault] for p in problems] == ["initpipeline.E002"]
    assert problems[0].msg == "the phases form a cycle: a -> b -> c -> a."
    with pytest.raises(PipelineConfigError, match=r"cycle: a -> b -> c -> a\.$"):
        pipeline.order()
    with pytest.raises(
        PipelineConfigError, match=r"cycle: a -> b -> c -> a\. \(initpipeline.E002\)$"
    ):
        validate_pipeline(pipeline)


def test_unknown_dependency() -> None:
    pipeline = make({"name": "a", "produces": "x", "after": "nosuch"})
    problems = pipeline.problems()
    assert [PIPELINE_IDS[p.fault] for p in problems] == ["initpipeline.E003"]
    assert problems[0].msg == "phase 'a' runs after 'nosuch', which is not a phase."


def test_artifact_produced_twice() -> None:
    pipeline = make({"name": "a", "produces": "x"}, {"name": "b", "produces": ["x", "y"]})
    problems = pipeline.problems()
    assert [PIPELINE_IDS[p.fault] for p in problems] == ["initpipeline.E004"]
    assert problems[0].msg == "artifact 'x' is produced by more than one phase: a, b."


def test_input_nobody_produces() -> None:
    pipeline = make({"name": "a", "produces": "x", "inputs": ["ghost"]})
    problems = pipeline.problems()
    assert [PIPELINE_IDS[p.fault] for p in problems] == ["initpipeline.E005"]
    assert problems[0].msg == "phase 'a' reads artifact 'ghost', which no phase produces."


def test_phase_without_artifact_and_bad_limits() -> None:
    pipeline = make({"name": "a"}, {"name": "b", "produces": "y", "retries": -1})
    assert ids(pipeline) == ["initpipeline.E011", "initpipeline.E012"]


def test_config_must_be_json() -> None:
    pipeline = make({"name": "a", "produces": "x", "config": {"when": object()}})
    problems = pipeline.problems()
    assert [PIPELINE_IDS[p.fault] for p in problems] == ["initpipeline.E006"]
    assert problems[0].msg.startswith("the config of phase 'a' cannot be used: TypeError")


def test_same_name_from_two_functions_is_reported() -> None:
    reg = Registry()
    reg.phase(name="a", produces="x")(noop)

    def other(ctx: Any) -> None:
        pass

    reg.phase(name="a", produces="x")(other)
    reg._discovered = True
    problems = reg.pipeline().problems()
    assert [PIPELINE_IDS[p.fault] for p in problems] == ["initpipeline.E010"]
    assert "registered twice" in problems[0].msg


def test_unknown_phase_name_lists_the_known_ones() -> None:
    with pytest.raises(PipelineConfigError, match=r"^unknown phase 'q' \(known: a, b, c\)$"):
        make(*LINEAR)["q"]


def test_fingerprint_changes_with_version_and_propagates_downstream() -> None:
    before = make(*LINEAR).fingerprints()
    bumped = make(LINEAR[0], {**LINEAR[1], "version": "2"}, LINEAR[2]).fingerprints()
    assert bumped["a"] == before["a"]
    assert bumped["b"] != before["b"]
    assert bumped["c"] != before["c"]


def test_fingerprint_covers_config_and_is_stable() -> None:
    one = make({"name": "a", "produces": "x", "config": {"k": 1, "j": [1, 2]}}).fingerprints()
    same = make({"name": "a", "produces": "x", "config": lambda: {"j": [1, 2], "k": 1}})
    other = make({"name": "a", "produces": "x", "config": {"k": 2, "j": [1, 2]}})
    assert one == same.fingerprints()
    assert one != other.fingerprints()
    assert len(one["a"]) == 64


def test_system_checks_report_pipeline_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = Registry()
    broken.phase(name="a", produces="x", after="b")(noop)
    broken.phase(name="b", produces="y", after="a")(noop)
    broken._discovered = True
    monkeypatch.setattr(registry_module, "registry", broken)
    errors = checks.run_checks(databases=[])
    # E008: the test settings require b_out, which this broken pipeline lacks.
    assert [e.id for e in errors] == ["initpipeline.E002", "initpipeline.E008"]


def test_project_pipeline_passes_the_checks() -> None:
    assert checks.run_checks(databases=[]) == []


def test_fingerprint_covers_the_phase_function_s_code() -> None:
    def other(ctx: Any) -> None:
        ctx.save_json("y", 1)

    before = make(*LINEAR).fingerprints()
    reg = Registry()
    for spec in LINEAR:
        spec = dict(spec)
        name = spec.pop("name")
        reg.phase(name=name, **spec)(other if name == "b" else noop)
    reg._discovered = True
    after = reg.pipeline().fingerprints()
    assert after["a"] == before["a"]
    assert after["b"] != before["b"]
    assert after["c"] != before["c"]


def test_recipe_says_what_the_fingerprint_is_made_of() -> None:
    pipeline = make(*LINEAR)
    recipes = pipeline.fingerprint_recipes()
    assert list(recipes) == ["a", "b", "c"]
    c = recipes["c"].recipe
    assert sorted(c) == ["code", "config", "inputs", "produces", "version"]
    assert c["inputs"] == {"b": recipes["b"].value}
    assert c["produces"] == ["z"]
    assert c["code"] == pipeline["c"].code_hash.sha256
    assert {name: fp.value for name, fp in recipes.items()} == pipeline.fingerprints()


def test_legacy_fingerprints_are_what_earlier_versions_recorded() -> None:
    # Computed by initpipeline before code counted in fingerprints: planning.py adopts the
    # artifacts recorded under them once, so this recipe must never change.
    assert make(*LINEAR).legacy_fingerprints() == {
        "a": "8baf6c8fb9b0092e1447422d82b99e1093986c0b07fec6a732a9ec3d0e0ae90f",
        "b": "c2554e58ea3670d4348946789238734dec4dceb428f3062207dfa189d05ad5b8",
        "c": "423d14c54463fd89b20930b3d92928154fd5ea0e5081167a084c9e7ad54ac05a",
    }
    configured = make({"name": "a", "produces": "x", "config": {"k": 1, "j": [1, 2]}, "version": 3})
    assert configured.legacy_fingerprints() == {
        "a": "cbc9f804e74eeac22e4f3ad6629c407c889935bba267a10b942ef08197242b2b"
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"shards": 0}, "phase 'a' has shards=0."),
        ({"shards": 10_001}, "phase 'a' has shards=10001."),
        ({"shards": lambda config: "many"}, "the shards of phase 'a' cannot be used"),
        ({"merge": lambda ctx: None}, "phase 'a' has a merge= but no shards=."),
    ],
)
def test_bad_shards_are_e028(spec: dict[str, Any], message: str) -> None:
    pipeline = make({"name": "a", "produces": "x", **spec})
    problems = pipeline.problems()
    assert [PIPELINE_IDS[p.fault] for p in problems] == ["initpipeline.E028"]
    assert problems[0].msg.startswith(message)


def test_the_shard_count_is_part_of_the_fingerprint() -> None:
    two = make({"name": "a", "produces": "x", "shards": 2}).fingerprints()
    three = make({"name": "a", "produces": "x", "shards": 3}).fingerprints()
    plain = make({"name": "a", "produces": "x"}).fingerprints()
    assert len({two["a"], three["a"], plain["a"]}) == 3


@pytest.mark.parametrize(
    ("spec", "check", "message"),
    [
        # A shard's record is "<phase>#<index>": a phase of that name would collide with it.
        (
            {"name": "squares#0", "produces": "y"},
            "initpipeline.E029",
            "phase 'squares#0' has a name that is empty, longer than 195 characters or holds '#'.",
        ),
        (
            {"name": "p" * 196, "produces": "y"},
            "initpipeline.E029",
            f"phase {'p' * 60!r} has a name that is empty, longer than 195 characters",
        ),
        # Valid alone, too long once a shard's part suffix is added to it.
        (
            {"name": "s", "produces": "x" * 190, "shards": 4},
            "initpipeline.E030",
            f"phase 's' has 4 shards, and its artifact {'x' * 190!r} is too long a name",
        ),
        (
            {"name": "v", "produces": "y", "version": "v" * 101},
            "initpipeline.E031",
            "phase 'v' has a version of 101 characters; its record holds 100.",
        ),
    ],
)
def test_names_and_lengths_that_would_fail_at_run_time_are_checks(
    spec: dict[str, Any], check: str, message: str
) -> None:
    problems = make(spec).problems()
    assert [PIPELINE_IDS[p.fault] for p in problems] == [check]
    assert problems[0].msg.startswith(message)
