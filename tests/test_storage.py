from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.test import override_settings

from initpipeline import digests, formats, loading, storage
from initpipeline.exceptions import (
    ArtifactCorrupt,
    ArtifactSignatureError,
    PipelineConfigError,
    UnknownDigest,
)
from initpipeline.models import Artifact, PhaseRun


def publish_bytes(data: bytes, name: str = "thing") -> storage.Published:
    path = storage.new_scratch_path(".bin")
    formats.write_bytes(path, data)
    return storage.publish(path, name=name, suffix=".bin")


def record(pub: storage.Published, name: str = "thing", fmt: str = "bytes") -> Artifact:
    return Artifact(
        name=name,
        fingerprint="f" * 64,
        storage_key=pub.key,
        digest=pub.digest,
        size=pub.size,
        format=fmt,
    )


def test_publish_uses_a_content_addressed_key_and_consumes_the_scratch_file(
    artifacts_dir: Path,
) -> None:
    path = storage.new_scratch_path(".bin")
    formats.write_bytes(path, b"hello")
    pub = storage.publish(path, name="greeting", suffix=".bin")
    b3 = "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"  # BLAKE3 of hello
    assert pub == storage.Published(f"greeting/blake3-{b3}.bin", f"blake3:{b3}", 5)
    assert (artifacts_dir / pub.key).read_bytes() == b"hello"
    assert not path.exists()


def test_publishing_the_same_bytes_twice_is_idempotent(artifacts_dir: Path) -> None:
    first = publish_bytes(b"same")
    second = publish_bytes(b"same")
    assert first == second
    assert len(list((artifacts_dir / "thing").glob(f"{digests.name_part(first.digest)}*"))) == 1


def published_as_before(data: bytes, artifacts_dir: Path, name: str = "thing") -> Artifact:
    """An artifact as releases before BLAKE3 published it: key ``<name>/<sha256 hex>.bin``,
    digest ``sha256:<hex>`` (what migration 0009 makes of their records)."""
    hexdigest = hashlib.sha256(data).hexdigest()
    key = f"{name}/{hexdigest}.bin"
    (artifacts_dir / name).mkdir(exist_ok=True)
    (artifacts_dir / key).write_bytes(data)
    os.chmod(artifacts_dir / key, 0o444)
    return Artifact(
        name=name, storage_key=key, digest=f"sha256:{hexdigest}", size=len(data), format="bytes"
    )


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_verify_detects_one_flipped_byte(artifacts_dir: Path, algorithm: str) -> None:
    data = b"x" * 1000 + b"payload"
    art = (
        record(publish_bytes(data))
        if algorithm == "blake3"
        else published_as_before(data, artifacts_dir)
    )
    assert art.digest.startswith(f"{algorithm}:")
    path = artifacts_dir / art.storage_key
    assert storage.verify(art) == path
    flipped = bytearray(path.read_bytes())
    flipped[500] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactCorrupt, match=f"fails its checksum: expected {algorithm}:"):
        storage.verify(art)
    assert storage.is_valid(art) is False
    path.unlink()


def test_an_artifact_of_an_earlier_release_verifies_with_sha256(artifacts_dir: Path) -> None:
    art = published_as_before(b"made before BLAKE3", artifacts_dir)
    assert storage.verify(art) == artifacts_dir / art.storage_key
    assert storage.is_valid(art) is True


@pytest.mark.django_db
def test_a_digest_of_an_unknown_algorithm_is_refused_with_a_clear_error(
    artifacts_dir: Path,
) -> None:
    pub = publish_bytes(b"from a newer release")
    art = record(pub)
    art.digest = "blake7:" + "0" * 64
    art.save()
    message = "'blake7:000.*' names a digest algorithm this release does not know .*Upgrade"
    with pytest.raises(UnknownDigest, match=message):
        storage.verify(art)
    assert storage.assess(art) == storage.UNREADABLE
    assert "names a digest algorithm this release does not know" in str(storage.problem(art))
    # This host's limit, not the artifact's fault: nothing is marked on its record.
    art.refresh_from_db()
    assert art.failed_check == ""


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


# -- SECRET_KEY rotation ------------------------------------------------------------------


def saved_pickle(value: object) -> Artifact:
    path = storage.new_scratch_path(".pkl")
    formats.write_pickle(path, value)
    pub = storage.publish(path, name="model", suffix=".pkl")
    art = record(pub, name="model", fmt="pickle")
    art.save()
    return art


@pytest.mark.django_db
def test_a_pickle_signed_with_a_fallback_key_still_loads(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SECRET_KEY = "old-key"
    art = saved_pickle({"w": [1, 2]})
    settings.SECRET_KEY = "new-key"
    settings.SECRET_KEY_FALLBACKS = ["old-key"]
    assert storage.is_valid(art) is True
    assert formats.read(storage.verify(art), "pickle") == {"w": [1, 2]}


@pytest.mark.django_db
def test_a_pickle_whose_key_was_rotated_out_is_invalid(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SECRET_KEY = "old-key"
    art = saved_pickle("data")
    assert storage.is_valid(art) is True  # verified, and remembered on this host
    settings.SECRET_KEY = "new-key"
    settings.SECRET_KEY_FALLBACKS = []
    # The host's record says which key verified it; that key is gone, so it is checked
    # again, fails, and stops counting as a cache here: start_init rebuilds it.
    assert storage.assess(art) == storage.UNREADABLE
    with pytest.raises(ArtifactSignatureError, match="neither SECRET_KEY nor SECRET_KEY_FALL"):
        storage.verify(art)


@pytest.mark.django_db
def test_a_host_with_a_stale_secret_key_does_not_mark_a_good_pickle_for_everyone(
    settings: Any, tmp_path: Path
) -> None:
    from initpipeline.health import UNSIGNED_OUTPUT, artifact_checks
    from tests.records import publish_generation

    settings.SECRET_KEY = "the-key"
    generation = publish_generation(model=("pickle", {"w": [1, 2]}))
    # Seen by this process now, not when the snapshot an earlier test left grows old.
    loading.active.refresh()
    art = generation.artifacts.get()
    stale, good = tmp_path / "stale-host", tmp_path / "good-host"
    for folder in (stale, good):
        folder.mkdir(mode=0o700)

    # A host whose SECRET_KEY is stale: its own problem, logged, and its readyz says so...
    settings.SECRET_KEY = "a-stale-key"
    with override_settings(INITPIPELINE={**settings.INITPIPELINE, "LOCAL_CACHE_DIR": str(stale)}):
        with pytest.raises(ArtifactSignatureError, match="has no valid signature"):
            storage.verify(art)
        assert storage.is_valid(art) is False
        check = artifact_checks(["model"])[0]
        assert (check.status, check.output) == ("fail", UNSIGNED_OUTPUT)
    # ...but not a verdict on the artifact: its shared record stays sound.
    art.refresh_from_db()
    assert art.failed_check == ""

    settings.SECRET_KEY = "the-key"
    with override_settings(INITPIPELINE={**settings.INITPIPELINE, "LOCAL_CACHE_DIR": str(good)}):
        assert storage.is_valid(art) is True
        assert formats.read(storage.verify(art), "pickle") == {"w": [1, 2]}
    # The stale host, its SECRET_KEY set right, checks the file again and serves it.
    with override_settings(INITPIPELINE={**settings.INITPIPELINE, "LOCAL_CACHE_DIR": str(stale)}):
        assert storage.problem(art) is None
        assert storage.is_valid(art) is True


@pytest.mark.django_db
def test_a_checksum_failure_is_still_marked_for_every_host(artifacts_dir: Path) -> None:
    art = record(publish_bytes(b"u" * 5000))
    art.save()
    path = artifacts_dir / art.storage_key
    os.chmod(path, 0o644)
    path.write_bytes(b"U" * 5000)
    with pytest.raises(ArtifactCorrupt, match="fails its checksum"):
        storage.verify(art)
    art.refresh_from_db()
    assert "fails its checksum" in art.failed_check
    path.unlink()


# -- verified once per host; changed in place -----------------------------------------------


def test_published_files_are_read_only(artifacts_dir: Path) -> None:
    pub = publish_bytes(b"read me only")
    assert (artifacts_dir / pub.key).stat().st_mode & 0o777 == 0o444


def test_a_host_hashes_a_file_once(monkeypatch: pytest.MonkeyPatch) -> None:
    art = record(publish_bytes(b"y" * 5000))
    hashed: list[Path] = []
    real = storage.file_digest

    def counting(path: Path | str, *args: str) -> tuple[str, int]:
        hashed.append(Path(path))
        return real(path, *args)

    monkeypatch.setattr(storage, "file_digest", counting)
    for _ in range(3):  # as three processes of one host would
        storage.verify(art)
    # Publishing recorded the hash it computed: no process of this host hashes it again.
    assert hashed == []


def test_a_file_changed_in_place_is_noticed_from_its_stat(artifacts_dir: Path) -> None:
    art = record(publish_bytes(b"z" * 5000))
    path = storage.verify(art)
    assert storage.problem(art) is None
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01  # same size, new mtime
    path.write_bytes(bytes(data))
    # A readiness probe sees it without hashing...
    assert storage.problem(art) == "its file changed since it was verified"
    # ...the next use hashes it and refuses it, and the verdict is remembered by the host.
    with pytest.raises(ArtifactCorrupt, match="fails its checksum"):
        storage.verify(art)
    assert "fails its checksum" in str(storage.problem(art))
    path.unlink()


def test_an_edit_in_place_whose_size_and_mtime_were_put_back_is_noticed(
    artifacts_dir: Path,
) -> None:
    art = record(publish_bytes(b"w" * 5000))
    path = storage.verify(art)
    before = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(10)
        fh.write(b"W")  # same size
    os.chmod(path, 0o444)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert storage.problem(art) == "its file changed since it was verified"
    with pytest.raises(ArtifactCorrupt, match="fails its checksum"):
        storage.verify(art)
    path.unlink()


def test_a_record_of_an_earlier_release_holds_until_the_file_changes(
    monkeypatch: pytest.MonkeyPatch, artifacts_dir: Path
) -> None:
    art = published_as_before(b"v" * 5000, artifacts_dir)
    path = artifacts_dir / art.storage_key
    # What releases before the ctime counted wrote: (device, inode, size, mtime), in a
    # record named by the sha256's hex.
    st = path.stat()
    legacy = {"path": str(path), "identity": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]}
    kept = storage.cache_dir() / "verified" / f"{art.digest.removeprefix('sha256:')}.json"
    kept.parent.mkdir(exist_ok=True)
    kept.write_text(json.dumps({**legacy, "ok": True}))
    # Written as the file was published (the same tick of the kernel's clock, at best).
    os.utime(kept, ns=(st.st_ctime_ns, st.st_ctime_ns))
    hashed: list[Path] = []
    real = storage.file_digest

    def counting(path: Path | str, *args: str) -> tuple[str, int]:
        hashed.append(Path(path))
        return real(path, *args)

    monkeypatch.setattr(storage, "file_digest", counting)
    storage.verify(art)
    assert storage.problem(art) is None
    assert hashed == []  # nothing touched the file since the record was written
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # sets the ctime, not the mtime
    changed = path.stat().st_ctime_ns
    # A change after the record was written (the clock's tick may not have passed yet).
    os.utime(kept, ns=(changed - 1, changed - 1))
    assert storage.problem(art) == "its file changed since it was verified"
    storage.verify(art)
    assert hashed == [path]


def test_a_missing_file_is_a_problem(artifacts_dir: Path) -> None:
    art = record(publish_bytes(b"going"))
    (artifacts_dir / art.storage_key).unlink()
    assert storage.problem(art) == "its file is missing from storage"


# -- names and paths ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", ".hidden", "a/b", "a..b", ""])
def test_publish_refuses_a_name_that_is_not_a_path_segment(name: str) -> None:
    path = storage.new_scratch_path(".bin")
    path.write_bytes(b"x")
    with pytest.raises(PipelineConfigError, match="not a valid artifact name"):
        storage.publish(path, name=name, suffix=".bin")
    assert not path.exists()


def test_a_symlink_inside_the_storage_is_not_followed(artifacts_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (artifacts_dir / "linked").symlink_to(outside)
    try:
        path = storage.new_scratch_path(".bin")
        path.write_bytes(b"secret")
        with pytest.raises(ArtifactCorrupt, match="leads outside the artifact folder"):
            storage.publish(path, name="linked", suffix=".bin")
        assert list(outside.iterdir()) == []
        art = Artifact(
            name="linked", storage_key="linked/x.bin", digest="sha256:" + "0" * 64, size=1
        )
        with pytest.raises(ArtifactCorrupt, match="leads outside"):
            storage.verify(art)
    finally:
        (artifacts_dir / "linked").unlink()


# -- failed writes and the host's cache folder ----------------------------------------------


FILE_SIZE_LIMIT = """
import os, resource, sys
import django
django.setup()
from initpipeline import storage
from initpipeline.context import PhaseContext
from initpipeline.models import PhaseRun
from initpipeline.registry import get_pipeline

# A real limit, as ulimit -f or a container's sets it: writes past it fail with EFBIG
# (CPython ignores SIGXFSZ, so the write raises instead of the process dying).
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
pipeline = get_pipeline()
row = PhaseRun(pk=1, run_id=99, attempt=1)
ctx = PhaseContext(phase=pipeline["a"], phase_run=row, pipeline=pipeline)
before = sorted(p.name for p in storage.scratch_dir().iterdir())
for save in (
    lambda: ctx.save_bytes("a_out", b"x" * (2 << 20)),
    lambda: ctx.save_json("a_out", ["x" * 1000] * 3000),
):
    try:
        save()
    except OSError as exc:
        print("refused:", exc.strerror)
after = sorted(p.name for p in storage.scratch_dir().iterdir())
print("left:", sorted(set(after) - set(before)))
"""


def test_a_write_past_a_file_size_limit_leaves_no_partial_file() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "refused: File too large",
        "refused: File too large",
        "left: []",
    ]


# -- publishing a large file: hashed beside the copy and the fsync --------------------------


def _context() -> Any:
    from initpipeline.context import PhaseContext
    from initpipeline.registry import get_pipeline

    pipeline = get_pipeline()
    phase_run = PhaseRun(pk=1, run_id=99, attempt=1)
    return PhaseContext(phase=pipeline["a"], phase_run=phase_run, pipeline=pipeline)


def _big(path: Path) -> bytes:
    data = os.urandom(1024) * (storage.OVERLAP_ABOVE // 1024 + 7)
    path.write_bytes(data)
    return data


def test_a_large_file_is_hashed_while_it_is_synced(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each side waits for the other to have started: only side by side do both finish.
    both = threading.Barrier(2, timeout=10)
    real_hash, real_sync = storage.file_digest, storage.fsync_file

    def hashing(path: Path | str) -> tuple[str, int]:
        both.wait()
        return real_hash(path)

    def syncing(path: Path) -> None:
        both.wait()
        real_sync(path)

    monkeypatch.setattr(storage, "file_digest", hashing)
    monkeypatch.setattr(storage, "fsync_file", syncing)
    path = storage.new_scratch_path(".bin")
    data = _big(path)
    pub = storage.publish(path, name="big", suffix=".bin")
    assert pub.size == len(data)
    assert real_hash(storage.local_path(record(pub, "big"))) == (pub.digest, pub.size)


def test_save_file_copies_a_large_file_and_leaves_the_source(tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    data = _big(source)
    ctx = _context()
    ctx.save_file("a_out", source)
    pub = ctx.published()["a_out"][0]
    path = storage.local_path(record(pub, "a_out", "file"))
    assert path.read_bytes() == data == source.read_bytes()
    assert storage.file_digest(path) == (pub.digest, pub.size)
    assert not list(storage.scratch_dir().glob("r99-*"))


def test_a_source_written_to_while_it_is_copied_is_hashed_as_copied(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source = tmp_path / "growing.bin"
    _big(source)
    real_copy = storage.shutil.copyfile

    def copy_then_append(src: Path, dst: Path) -> None:
        real_copy(src, dst)
        with open(src, "ab") as fh:
            fh.write(b"more")

    monkeypatch.setattr(storage.shutil, "copyfile", copy_then_append)
    path = storage.new_scratch_path()
    pub = storage.publish(path, name="grown", suffix="", copy_from=source)
    published = storage.local_path(record(pub, "grown"))
    assert storage.file_digest(published) == (pub.digest, pub.size)
    assert pub.size == source.stat().st_size - 4


def test_publishing_bytes_this_host_verified_does_not_hash_them_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = publish_bytes(b"same again")
    hashed: list[Path] = []
    real = storage.file_digest

    def counting(path: Path | str, *args: str) -> tuple[str, int]:
        hashed.append(Path(path))
        return real(path, *args)

    monkeypatch.setattr(storage, "file_digest", counting)
    assert publish_bytes(b"same again") == first
    assert len(hashed) == 1  # the new scratch file; not the published one again


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_cache_folder_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(mode)
    with (
        override_settings(INITPIPELINE={"LOCAL_CACHE_DIR": str(folder)}),
        pytest.raises(PipelineConfigError, match="must belong to this user .* not be writable"),
    ):
        storage.cache_dir()


def test_a_cache_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user here")
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    with (
        override_settings(INITPIPELINE={"LOCAL_CACHE_DIR": str(folder)}),
        pytest.raises(PipelineConfigError, match="owned by another user"),
    ):
        storage.cache_dir()


def test_the_default_cache_folder_is_private_to_this_user(tmp_path: Path) -> None:
    with override_settings(INITPIPELINE={"LOCAL_CACHE_DIR": None}):
        folder = storage.cache_dir()
    assert folder.name == f"initpipeline-cache-{os.geteuid()}"
    assert folder.stat().st_mode & 0o777 == 0o700


def test_a_cache_folder_behind_a_link_or_in_a_folder_anyone_may_write_is_refused(
    tmp_path: Path,
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(private)
    with (
        override_settings(INITPIPELINE={"LOCAL_CACHE_DIR": str(link)}),
        pytest.raises(PipelineConfigError, match="is a symbolic link"),
    ):
        storage.cache_dir()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: another user could rename our folder away
    with (
        override_settings(INITPIPELINE={"LOCAL_CACHE_DIR": str(shared / "cache")}),
        pytest.raises(PipelineConfigError, match="anyone may write without the sticky bit"),
    ):
        storage.cache_dir()
    shared.chmod(0o1777)  # as /tmp: the sticky bit keeps others from renaming it
    with override_settings(INITPIPELINE={"LOCAL_CACHE_DIR": str(shared / "cache")}):
        assert storage.cache_dir() == shared / "cache"
