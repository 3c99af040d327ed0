"""The docs speak of the code as it is: every command line of initpipeline's commands in
README.md and docs/ parses with that command's own parser, each command's synopsis lists
every option it takes, and every make target, bench figure and system check id they name
exists (and every check id is documented).

The commands' effects are tested where they are used: test_commands*, test_new_project (the
README's "Add it to your project", step by step), test_deploy (the deploy recipes).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from django.core.management import load_command_class
from django.core.management.base import BaseCommand, CommandError

from tests.conftest import ROOT

COMMANDS = ("start_init", "init_status", "cancel_init", "init_gc")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: What the synopses write for an option's value, and a value the parser takes for it.
PLACEHOLDERS = {"PHASE": "a_phase", "ID": "1", "N": "3"}


def code_spans() -> Iterator[tuple[str, str]]:
    """(document, text) of every `inline code` span and every `$ ` line of a code block."""
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"`([^`\n]+)`", text):
            yield doc.name, match.group(1)
        for match in re.finditer(r"^\$ (.+)$", text, flags=re.MULTILINE):
            yield doc.name, match.group(1)


def command_lines() -> list[tuple[str, str, list[str]]]:
    """(document, command, arguments) of every distinct line that runs one of COMMANDS."""
    found: dict[tuple[str, ...], tuple[str, str, list[str]]] = {}
    for doc, span in code_spans():
        for piece in re.split(r"&&|\|\||;|\|", span):
            words = piece.split()
            for i, word in enumerate(words):
                if word in COMMANDS:
                    found.setdefault(tuple(words[i:]), (doc, word, words[i + 1 :]))
                    break
    return list(found.values())


def as_arguments(words: list[str]) -> list[str]:
    """A synopsis (`--from PHASE] [--only PHASE ...]`) as arguments a parser takes."""
    args = []
    for word in words:
        word = word.strip("[]")
        if word in ("", "...", "#") or word.startswith("#"):
            continue
        args.append(PLACEHOLDERS.get(word, word))
    return args


def own_options(name: str) -> set[str]:
    """The long options ``name`` adds to those of every Django command."""
    base = BaseCommand().create_parser("manage.py", "base")
    common = {o for a in base._actions for o in a.option_strings}
    parser = load_command_class("initpipeline", name).create_parser("manage.py", name)
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - common


LINES = command_lines()


def test_the_docs_run_each_command() -> None:
    assert {command for _, command, _ in LINES} == set(COMMANDS)


@pytest.mark.parametrize(
    ("doc", "command", "words"),
    LINES,
    ids=[f"{doc}:{command} {' '.join(words)}".strip() for doc, command, words in LINES],
)
def test_every_command_line_of_the_docs_parses(doc: str, command: str, words: list[str]) -> None:
    parser = load_command_class("initpipeline", command).create_parser("manage.py", command)
    try:
        parser.parse_args(as_arguments(words))
    except CommandError as exc:
        pytest.fail(f"{doc}: `{command} {' '.join(words)}` does not parse: {exc}")


@pytest.mark.parametrize("command", COMMANDS)
def test_the_synopsis_lists_every_option_of_the_command(command: str) -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(rf"^\| `{command}( [^`]*)?` \|", readme, flags=re.MULTILINE)
    assert rows, f"the README's command table has no row for {command}"
    listed = {w.strip("[]") for row in rows for w in row.split() if w.strip("[]").startswith("--")}
    assert listed == own_options(command)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, flags=re.MULTILINE))


def test_every_make_target_named_exists() -> None:
    named = {
        (doc, target)
        for doc, span in code_spans()
        for target in re.findall(r"^make ([a-z][a-z0-9-]*)", span.strip())
    }
    assert named, "the docs name no make target"
    targets = makefile_targets()
    assert {(doc, t) for doc, t in named if t not in targets} == set()
    # The README's two commands, at least.
    assert {"demo", "test"} <= {t for _, t in named}


def test_every_bench_figure_named_exists() -> None:
    from bench.__main__ import FIGURES

    named = set()
    for _, span in code_spans():
        match = re.search(r"python -m bench --only ((?:[a-z_]+ ?)+)", span)
        if match:
            named.update(match.group(1).split())
    assert named
    assert named - set(FIGURES) == set()


def test_every_check_id_is_documented_and_every_documented_one_exists() -> None:
    source = (ROOT / "initpipeline" / "checks.py").read_text()
    defined = set(re.findall(r'"initpipeline\.([EW]\d{3})"', source))
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(?:initpipeline\.)?([EW]\d{3})`", readme))
    assert defined, "no check id found in initpipeline/checks.py"
    assert documented == defined


def test_placeholders_are_the_synopses_own() -> None:
    # Every capitalised word of a synopsis is a placeholder this test knows how to fill.
    words = {w.strip("[]") for _, _, line in LINES for w in line}
    assert {w for w in words if w.isupper()} <= set(PLACEHOLDERS)


def test_a_synopsis_with_an_unknown_option_fails_to_parse() -> None:
    parser = load_command_class("initpipeline", "init_gc").create_parser("manage.py", "init_gc")
    with pytest.raises(CommandError):
        parser.parse_args(as_arguments(["[--no-such-option]"]))
