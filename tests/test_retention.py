from __future__ import annotations

from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone

from initpipeline import formats, retention, storage
from initpipeline.models import Artifact, Generation, PipelineRun

pytestmark = pytest.mark.django_db(transaction=True)


def generation(
    n: int, *, age: int, active: bool = False, shared: Artifact | None = None
) -> Generation:
    when = timezone.now() - timedelta(hours=age)
    run = PipelineRun.objects.create(state="succeeded", created_at=when, finished_at=when)
    path = storage.new_scratch_path(".bin")
    formats.write_bytes(path, f"generation {n}".encode())
    pub = storage.publish(path, name="thing", suffix=".bin")
    art = Artifact.objects.create(
        name="thing",
        fingerprint=str(n) * 64,
        storage_key=pub.key,
        sha256=pub.sha256,
        size=pub.size,
        format="bytes",
        run=run,
        created_at=when,
    )
    gen = Generation.objects.create(run=run, created_at=when, activated_at=when, is_active=active)
    gen.artifacts.set([art] + ([shared] if shared else []))
    return gen


def test_keeps_the_last_generations_and_deletes_older_files(artifacts_dir: Path) -> None:
    gens = [generation(n, age=10 - n) for n in range(1, 5)]
    Generation.objects.filter(pk=gens[-1].pk).update(is_active=True)
    removed = retention.collect(keep=2)
    assert [a.run_id for a in removed] == [gens[0].run_id, gens[1].run_id]
    for gen in gens:
        key = gen.artifacts.get().storage_key
        assert (artifacts_dir / key).exists() == (gen in gens[2:])
    # Records stay: history is never rewritten.
    assert Artifact.objects.count() == 4


def test_never_deletes_the_active_generation_even_when_old(artifacts_dir: Path) -> None:
    old_active = generation(1, age=50, active=True)
    for n in range(2, 5):
        generation(n, age=10 - n)
    retention.collect(keep=1)
    assert (artifacts_dir / old_active.artifacts.get().storage_key).exists()


def test_a_file_shared_with_a_kept_generation_stays(artifacts_dir: Path) -> None:
    first = generation(1, age=9)
    shared = first.artifacts.get()
    generation(2, age=1, active=True, shared=shared)
    assert retention.collect(keep=1) == []
    assert (artifacts_dir / shared.storage_key).exists()


def test_init_gc_command_dry_run_lists_without_deleting(artifacts_dir: Path) -> None:
    old = generation(1, age=9)
    generation(2, age=1, active=True)
    out = StringIO()
    call_command("init_gc", "--keep", "1", "--dry-run", stdout=out)
    key = old.artifacts.get().storage_key
    size = old.artifacts.get().size
    assert out.getvalue() == (
        f"would delete {key} ({size} bytes)\nwould delete 1 files, {size} bytes\n"
    )
    assert (artifacts_dir / key).exists()


def test_old_scratch_files_of_killed_workers_are_removed() -> None:
    import os
    import time

    old = storage.new_scratch_path(".npy")
    old.write_bytes(b"half written")
    os.utime(old, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    fresh = storage.new_scratch_path(".npy")
    fresh.write_bytes(b"being written now")
    generation(1, age=1, active=True)
    retention.collect(keep=1)
    assert not old.exists()
    assert fresh.exists()
    fresh.unlink()
