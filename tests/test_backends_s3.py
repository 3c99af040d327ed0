"""Artifacts on S3 (django-storages' S3Storage, boto3) against moto's server: publishing
under content-addressed keys, a real worker, and web processes reading through a local,
verified cache."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from blake3 import blake3
from django.conf import settings
from django.test import override_settings

from initpipeline import digests, formats, loading, storage
from initpipeline.exceptions import ArtifactCorrupt
from initpipeline.models import Artifact, Generation, PipelineRun
from tests.conftest import ROOT, Stack
from tests.servers import MotoServer
from tests.settings import s3_storage

pytestmark = [pytest.mark.slow]


@dataclass
class Bucket:
    client: Any
    name: str
    endpoint: str
    cache: Path

    def keys(self) -> list[str]:
        listing = self.client.list_objects_v2(Bucket=self.name)
        return sorted(obj["Key"] for obj in listing.get("Contents", []))

    def read(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def cached(self) -> list[str]:
        """The artifact copies in this host's cache (not its records or scratch folders)."""
        return sorted(p.name for p in self.cache.iterdir() if p.is_file())

    def another_host(self) -> override_settings:
        """Settings of a second host: the same bucket, its own (empty) cache."""
        self.cache = self.cache.with_name(self.cache.name + "-2")
        return s3_settings(self)

    def env(self) -> dict[str, str]:
        """What a worker subprocess needs to use this bucket (tests/settings.py)."""
        return {
            "INITPIPELINE_TEST_S3_ENDPOINT": self.endpoint,
            "INITPIPELINE_TEST_S3_BUCKET": self.name,
        }


def s3_settings(bucket: Bucket, **options: Any) -> override_settings:
    return override_settings(
        STORAGES={
            **settings.STORAGES,
            "initpipeline": s3_storage(bucket.endpoint, bucket.name, **options),
        },
        # Each test is a fresh host: nothing downloaded yet.
        INITPIPELINE={**settings.INITPIPELINE, "LOCAL_CACHE_DIR": str(bucket.cache)},
    )


@pytest.fixture
def bucket(moto_server: MotoServer, tmp_path: Path) -> Iterator[Bucket]:
    client = moto_server.client()
    name = f"initpipeline-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    b = Bucket(client, name, moto_server.url, tmp_path / "web-cache")
    with s3_settings(b):
        yield b


def publish_bytes(data: bytes, name: str = "thing") -> storage.Published:
    path = storage.new_scratch_path(".bin")
    formats.write_bytes(path, data)
    return storage.publish(path, name=name, suffix=".bin")


def record(pub: storage.Published, name: str = "thing") -> Artifact:
    return Artifact(
        name=name,
        fingerprint="f" * 64,
        storage_key=pub.key,
        digest=pub.digest,
        size=pub.size,
        format="bytes",
    )


def test_publish_puts_one_object_under_the_content_addressed_key(bucket: Bucket) -> None:
    data = b"hello s3"
    b3 = blake3(data).hexdigest()
    path = storage.new_scratch_path(".bin")
    formats.write_bytes(path, data)
    first = storage.publish(path, name="greeting", suffix=".bin")
    assert first == storage.Published(f"greeting/blake3-{b3}.bin", f"blake3:{b3}", len(data))
    assert not path.exists()
    assert publish_bytes(data, name="greeting") == first
    assert bucket.keys() == [f"greeting/blake3-{b3}.bin"]
    assert bucket.read(first.key) == data


@pytest.mark.parametrize("file_overwrite", [True, False])
def test_a_publish_racing_another_worker_keeps_one_key(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch, file_overwrite: bool
) -> None:
    # file_overwrite=False makes django-storages (like Django's FileSystemStorage) save
    # under a suffixed name when the key exists: a second key for the same content.
    with s3_settings(bucket, file_overwrite=file_overwrite):
        first = publish_bytes(b"same bytes")
        s3 = storage.get_storage()
        looks: list[str] = []
        real_exists = s3.exists

        def exists_late(name: str) -> bool:
            # The other worker's object appears between our look and our save.
            looks.append(name)
            return len(looks) > 1 and bool(real_exists(name))

        monkeypatch.setattr(s3, "exists", exists_late)
        second = publish_bytes(b"same bytes")
    assert second == first
    assert bucket.keys() == [first.key]


def test_a_short_object_under_the_key_is_replaced(bucket: Bucket) -> None:
    data = b"the whole content"
    key = f"thing/blake3-{blake3(data).hexdigest()}.bin"
    bucket.write(key, data[:5])
    with s3_settings(bucket, file_overwrite=False):
        pub = publish_bytes(data)
    assert pub.key == key
    assert bucket.keys() == [key]
    assert bucket.read(key) == data


def flip_a_byte(bucket: Bucket, key: str) -> None:
    flipped = bytearray(bucket.read(key))
    flipped[len(flipped) // 2] ^= 0x01
    bucket.write(key, bytes(flipped))


@pytest.mark.django_db
def test_a_corrupted_object_is_refused_and_nothing_is_cached(bucket: Bucket) -> None:
    pub = publish_bytes(b"x" * 1000 + b"payload")
    # The publishing host kept the bytes it uploaded as its verified copy.
    assert bucket.cached() == [f"{digests.name_part(pub.digest)}.bin"]
    art = record(pub)
    art.save()
    flip_a_byte(bucket, pub.key)
    with bucket.another_host():
        assert storage.is_valid(art) is True  # an object of the right size: not known bad
        with pytest.raises(ArtifactCorrupt, match=r"fails its checksum in storage"):
            storage.verify(art)
        assert bucket.cached() == []
        # What one host found, every host and the next start_init know.
        art.refresh_from_db()
        assert "fails its checksum in storage" in art.failed_check
        assert storage.is_valid(art) is False


def test_publishing_again_replaces_a_corrupted_object(bucket: Bucket) -> None:
    data = b"x" * 1000 + b"the right bytes"
    pub = publish_bytes(data)
    flip_a_byte(bucket, pub.key)
    # Same size, other bytes: a publish compares the content, not only the size.
    with bucket.another_host():
        assert publish_bytes(data) == pub
    assert bucket.read(pub.key) == data


def test_a_bad_copy_in_the_local_cache_is_downloaded_again(bucket: Bucket) -> None:
    pub = publish_bytes(b"y" * 5000)
    art = record(pub)
    path = storage.verify(art)
    assert path == bucket.cache / f"{digests.name_part(pub.digest)}.bin"
    path.chmod(0o600)
    path.write_bytes(b"y" * 10)  # A copy cut short, say by a crash.
    assert storage.verify(art) == path
    assert path.read_bytes() == b"y" * 5000
    assert bucket.cached() == [path.name]


DOWNLOAD = """
import sys, time
from pathlib import Path
import django
django.setup()
from initpipeline import storage
from initpipeline.models import Artifact
key, digest, size, go = sys.argv[1:]
art = Artifact(name="big", storage_key=key, digest=digest, size=int(size), format="bytes")
while not Path(go).exists():
    time.sleep(0.01)
print(storage.verify(art))
"""


def test_concurrent_downloads_by_several_processes_leave_one_good_copy(
    bucket: Bucket, tmp_path: Path
) -> None:
    data = np.random.default_rng(7).bytes(16 * 1024 * 1024)
    pub = publish_bytes(data, name="big")
    go = tmp_path / "go"
    bucket.cache = tmp_path / "other-host-cache"  # the publisher's copy is elsewhere
    env = {
        **bucket.env(),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "INITPIPELINE_TEST_CACHE_DIR": str(bucket.cache),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DOWNLOAD, pub.key, pub.digest, str(pub.size), str(go)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outputs]
    target = bucket.cache / f"{digests.name_part(pub.digest)}.bin"
    assert {out.strip() for out, _ in outputs} == {str(target)}
    assert storage.file_digest(target) == (pub.digest, pub.size)
    assert bucket.cached() == [target.name]


def test_pipeline_on_s3_through_a_worker_and_a_web_load_from_the_cache(
    stack: Stack, bucket: Bucket
) -> None:
    stack.env.update(bucket.env())
    stack.start_worker()
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + stack.log()
    run = PipelineRun.objects.get()
    assert run.state == "succeeded"
    generation = Generation.objects.get(is_active=True)
    records = generation.artifact_map()
    # The database points at content-addressed keys, one object each, nothing else.
    assert {name: r.storage_key for name, r in records.items()} == {
        name: f"{name}/{digests.name_part(r.digest)}{formats.SUFFIX[r.format]}"
        for name, r in records.items()
    }
    assert bucket.keys() == sorted(r.storage_key for r in records.values())

    # The web side: a fresh handle, as in a newly started process.
    b_out = records["b_out"]
    loading.active.refresh()
    handle = loading.ArtifactHandle("b_out")
    array = handle.get()
    assert isinstance(array, np.memmap)
    assert array.tolist() == [2 * i + 1.0 for i in range(10)]
    cached = bucket.cache / f"{digests.name_part(b_out.digest)}.npy"
    assert Path(array.filename) == cached
    assert bucket.cached() == [cached.name]
    # A second process on the same host reuses the copy (the same file, not a download).
    inode = cached.stat().st_ino
    assert loading.ArtifactHandle("b_out").get().tolist() == array.tolist()
    assert cached.stat().st_ino == inode

    again = stack.manage("start_init")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"up to date: generation {generation.pk} is active"


PUBLISH = """
import django
django.setup()
from initpipeline import formats, storage
path = storage.new_scratch_path(".bin")
formats.write_bytes(path, b"from the demo settings")
print(storage.publish(path, name="thing", suffix=".bin").key)
"""


def test_demo_settings_put_artifacts_on_s3_when_a_bucket_is_named(
    bucket: Bucket, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "INITPIPELINE_VAR_DIR": str(tmp_path / "var"),
        "INITPIPELINE_S3_BUCKET": bucket.name,
        "AWS_S3_ENDPOINT_URL": bucket.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = subprocess.run(
        [sys.executable, "-c", PUBLISH], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key == f"thing/blake3-{blake3(b'from the demo settings').hexdigest()}.bin"
    # Under the demo's "artifacts" prefix of the bucket.
    assert bucket.keys() == [f"artifacts/{key}"]


def test_a_flipped_byte_on_s3_is_rebuilt_by_the_next_start_init(
    stack: Stack, bucket: Bucket
) -> None:
    stack.env.update(bucket.env())
    stack.start_worker()
    assert stack.manage("start_init", "--wait").returncode == 0, stack.log()
    b_out = Generation.objects.get(is_active=True).artifact_map()["b_out"]
    good = bucket.read(b_out.storage_key)
    flip_a_byte(bucket, b_out.storage_key)
    # A web host loads it, finds it corrupt, refuses it and says so in the records.
    loading.active.refresh()
    with pytest.raises(ArtifactCorrupt, match="fails its checksum in storage"):
        loading.ArtifactHandle("b_out").get()
    result = stack.manage("start_init", "--wait")
    assert result.returncode == 0, result.stderr + stack.log()
    second = PipelineRun.objects.latest_first().first()
    assert second is not None
    assert dict(second.phases.values_list("name", "state")) == {
        "a": "cached",
        "b": "succeeded",
        "c": "cached",
    }
    # The same bytes under the same key, whole again.
    assert bucket.read(b_out.storage_key) == good


@pytest.mark.django_db
def test_a_folder_artifact_reaches_another_host_as_a_folder(bucket: Bucket, tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text('{"layers": 2}')
    (model / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    path = storage.new_scratch_path(".tar")
    formats.write_dir(path, model)
    pub = storage.publish(path, name="model", suffix=".tar")
    assert bucket.keys() == [f"model/{digests.name_part(pub.digest)}.tar"]
    art = Artifact(
        name="model",
        fingerprint="f" * 64,
        storage_key=pub.key,
        digest=pub.digest,
        size=pub.size,
        format="dir",
    )
    with bucket.another_host():
        folder = storage.materialize(art)
        # A local folder on the new host, as a loader (spacy.load, from_pretrained) wants.
        assert folder == bucket.cache / "dirs" / digests.name_part(pub.digest)
        found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert found == {"config.json", "tokenizer/vocab.txt"}
        assert (folder / "config.json").read_text() == '{"layers": 2}'
        assert storage.materialize(art) == folder  # once per host

    # A byte flipped in storage: a third host refuses it, and unpacks nothing.
    data = bytearray(bucket.read(pub.key))
    data[-700] ^= 1
    bucket.write(pub.key, bytes(data))
    with bucket.another_host(), pytest.raises(ArtifactCorrupt, match="fails its checksum"):
        storage.materialize(art)
    assert not (bucket.cache / "dirs").exists()
