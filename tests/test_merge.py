"""The default merge of a sharded phase's JSON parts: the lists concatenated in shard order,
streamed byte for byte (tests/test_shards.py runs it in real workers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from initpipeline import formats, shards
from initpipeline.exceptions import PipelineConfigError


class Merging:
    """What _merge_json uses of a PhaseContext: it writes the merged file in tmp_path."""

    name = "phase"

    def __init__(self, tmp_path: Path) -> None:
        self.out = tmp_path / "merged.json"
        self.progressed: list[tuple[float, float | None]] = []

    def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        self.progressed.append((done, total))

    def save_prepared(self, name: str, fmt: str, write: Any, metadata: Any = None) -> None:
        assert fmt == "json"
        write(self.out)


def merge(tmp_path: Path, texts: list[bytes]) -> Any:
    paths = []
    for i, text in enumerate(texts):
        path = tmp_path / f"part-{i}.json"
        path.write_bytes(text)
        paths.append(path)
    ctx = Merging(tmp_path)
    shards._merge_json(ctx, "items", paths)  # type: ignore[arg-type]
    assert ctx.progressed == [(i + 1, len(texts)) for i in range(len(texts))]
    return formats.read(ctx.out, "json")


def written(value: Any, tmp_path: Path) -> bytes:
    path = tmp_path / "w.json"
    formats.write_json(path, value)
    return path.read_bytes()


def test_lists_are_concatenated_in_shard_order(tmp_path: Path) -> None:
    parts = [[1, "a,]"], [], [{"k": [2, 3]}], ["é", None]]
    texts = [written(p, tmp_path) for p in parts]
    assert merge(tmp_path, texts) == [1, "a,]", {"k": [2, 3]}, "é", None]


def test_empty_parts_give_an_empty_list(tmp_path: Path) -> None:
    assert merge(tmp_path, [b"[]", b" [ \n ] \n"]) == []


def test_whitespace_around_and_inside_the_brackets(tmp_path: Path) -> None:
    texts = [b"\n  [ 1 ,\n 2 ]\n", b"[3]", b"[\n  ]", b'[ "x" ]   ']
    assert merge(tmp_path, texts) == [1, 2, 3, "x"]


def test_parts_larger_than_a_chunk(tmp_path: Path) -> None:
    big = list(range(400_000))  # about 2.6 MB: more than formats.CHUNK and the 64 KiB probes
    assert len(written(big, tmp_path)) > formats.CHUNK
    assert merge(tmp_path, [written(big, tmp_path), b"[-1]", written(big, tmp_path)]) == [
        *big,
        -1,
        *big,
    ]


@pytest.mark.parametrize("value", [{"a": 1}, "text", 3])
def test_a_part_that_is_not_a_list_is_refused_with_its_type(tmp_path: Path, value: Any) -> None:
    texts = [b"[1]", json.dumps(value).encode()]
    with pytest.raises(
        PipelineConfigError,
        match=f"shard 1's part of 'items' is a JSON {type(value).__name__}, not a list",
    ):
        merge(tmp_path, texts)


def test_json_parts_are_never_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed byte for byte: a merge that parsed its parts would raise here."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a part was parsed")

    parts = [
        written([{"k": i, "v": [i] * 3} for i in range(n, n + 500)], tmp_path) for n in (0, 500)
    ]
    monkeypatch.setattr(json, "load", refuse)
    monkeypatch.setattr(json, "loads", refuse)
    monkeypatch.setattr(formats, "read", refuse)
    paths = []
    for i, text in enumerate(parts):
        path = tmp_path / f"part-{i}.json"
        path.write_bytes(text)
        paths.append(path)
    ctx = Merging(tmp_path)
    shards._merge_json(ctx, "items", paths)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert json.loads(ctx.out.read_bytes()) == [{"k": i, "v": [i] * 3} for i in range(1000)]


@pytest.mark.parametrize("fmt", ["bytes", "file"])
def test_bytes_and_file_parts_are_joined_in_shard_order(tmp_path: Path, fmt: str) -> None:
    paths = []
    for i, data in enumerate([b"first,", b"", b"second" * 300_000, b",last"]):
        path = tmp_path / f"part-{i}.bin"
        path.write_bytes(data)
        paths.append(path)

    class Joining(Merging):
        def save_prepared(self, name: str, got: str, write: Any, metadata: Any = None) -> None:
            assert got == fmt
            write(self.out)

    ctx = Joining(tmp_path)
    shards._MERGERS[fmt](ctx, "blob", paths)  # type: ignore[arg-type]
    assert ctx.out.read_bytes() == b"first," + b"second" * 300_000 + b",last"
    assert [done for done, _ in ctx.progressed] == [1, 2, 3, 4]
