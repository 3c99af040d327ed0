from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from initpipeline import formats, storage
from initpipeline.exceptions import ArtifactCorrupt, ArtifactSignatureError
from initpipeline.models import Artifact


def publish_bytes(data: bytes, name: str = "thing") -> storage.Published:
    path = storage.new_scratch_path(".bin")
    formats.write_bytes(path, data)
    return storage.publish(path, name=name, suffix=".bin")


def record(pub: storage.Published, name: str = "thing", fmt: str = "bytes") -> Artifact:
    return Artifact(
        name=name,
        fingerprint="f" * 64,
        storage_key=pub.key,
        sha256=pub.sha256,
        size=pub.size,
        format=fmt,
    )


def test_publish_uses_a_content_addressed_key_and_consumes_the_scratch_file(
    artifacts_dir: Path,
) -> None:
    path = storage.new_scratch_path(".bin")
    formats.write_bytes(path, b"hello")
    pub = storage.publish(path, name="greeting", suffix=".bin")
    sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert pub == storage.Published(f"greeting/{sha}.bin", sha, 5)
    assert (artifacts_dir / pub.key).read_bytes() == b"hello"
    assert not path.exists()


def test_publishing_the_same_bytes_twice_is_idempotent(artifacts_dir: Path) -> None:
    first = publish_bytes(b"same")
    second = publish_bytes(b"same")
    assert first == second
    assert len(list((artifacts_dir / "thing").glob(f"{first.sha256}*"))) == 1


def test_verify_detects_one_flipped_byte(artifacts_dir: Path) -> None:
    pub = publish_bytes(b"x" * 1000 + b"payload")
    art = record(pub)
    assert storage.verify(art) == artifacts_dir / pub.key
    path = artifacts_dir / pub.key
    data = bytearray(path.read_bytes())
    data[500] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match="fails its checksum"):
        storage.verify(art)
    assert storage.is_valid(art) is False
    path.unlink()


def test_missing_file_is_not_valid(artifacts_dir: Path) -> None:
    pub = publish_bytes(b"soon gone")
    (artifacts_dir / pub.key).unlink()
    assert storage.is_valid(record(pub)) is False


def test_npy_loads_memory_mapped_read_only(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    formats.write_npy(path, np.arange(6, dtype=np.float32).reshape(2, 3))
    loaded = formats.read(path, "npy")
    assert isinstance(loaded, np.memmap)
    assert loaded.tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError):
        loaded[0, 0] = 9


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="object arrays"):
        formats.write_npy(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))


def test_signed_pickle_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "p.pkl"
    formats.write_pickle(path, {"model": [1, 2, 3]})
    assert formats.read(path, "pickle") == {"model": [1, 2, 3]}


class Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("raise SystemExit('pickle code ran')",))


def test_unsigned_pickle_is_refused_before_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ArtifactSignatureError, match="not a signed initpipeline pickle"):
        formats.read(path, "pickle")


def test_pickle_with_a_forged_payload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.pkl"
    formats.write_pickle(path, "harmless")
    blob = path.read_bytes()
    head = len(formats.PICKLE_MAGIC) + 32
    path.write_bytes(blob[:head] + pickle.dumps(Boom()))
    with pytest.raises(ArtifactSignatureError, match="wrong signature"):
        formats.read(path, "pickle")


def test_pickle_signed_with_another_secret_key_is_refused(tmp_path: Path, settings) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.pkl"
    formats.write_pickle(path, "data")
    settings.SECRET_KEY = "another-key"
    with pytest.raises(ArtifactSignatureError):
        formats.read(path, "pickle")
