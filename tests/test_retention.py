from __future__ import annotations

from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from django.utils import timezone

from initpipeline import digests, formats, outcomes, retention, storage
from initpipeline.models import Artifact, Generation, PhaseRun, PipelineRun
from tests.records import done, live_run, publish_generation, record_artifacts

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
        digest=pub.digest,
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
    others = [generation(n, age=10 - n) for n in range(2, 5)]
    removed = retention.collect(keep=1)
    # The newest generation is kept, the active one too although it is the oldest; the
    # two in between go.
    assert [a.run_id for a in removed] == [others[0].run_id, others[1].run_id]
    assert (artifacts_dir / old_active.artifacts.get().storage_key).exists()
    assert not (artifacts_dir / others[0].artifacts.get().storage_key).exists()


def test_a_file_shared_with_a_kept_generation_stays(artifacts_dir: Path) -> None:
    first = generation(1, age=9)
    shared = first.artifacts.get()
    generation(2, age=1, active=True, shared=shared)
    assert retention.collect(keep=1) == []
    assert (artifacts_dir / shared.storage_key).exists()


def verified_record(host_cache: Path, art: Artifact) -> Path:
    """What publishing ``art`` left in the host's cache: the record that it was verified."""
    record = host_cache / "verified" / f"{digests.name_part(art.digest)}.json"
    assert record.is_file()
    return record


def test_init_gc_command_dry_run_lists_without_deleting(
    artifacts_dir: Path, host_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = generation(1, age=9)
    generation(2, age=1, active=True)
    record = verified_record(host_cache, old.artifacts.get())
    monkeypatch.setattr(retention, "RECENT", -3600.0)  # everything counts as made before
    out = StringIO()
    call_command("init_gc", "--keep", "1", "--dry-run", stdout=out)
    key = old.artifacts.get().storage_key
    size = old.artifacts.get().size
    assert out.getvalue() == (
        f"would delete {key} ({size} bytes)\nwould delete 1 files, {size} bytes\n"
        f"would delete 1 entries of this host's cache, {record.stat().st_size} bytes\n"
    )
    assert (artifacts_dir / key).exists()
    assert record.exists()


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


def test_keeps_an_old_artifact_that_a_run_in_flight_will_activate(artifacts_dir: Path) -> None:
    old = generation(1, age=9)
    generation(2, age=1, active=True)
    cached = old.artifacts.get()
    # A run in flight found the old generation's artifact cached by its fingerprint.
    run = PipelineRun.objects.create(state="running")
    PhaseRun.objects.create(
        run=run, name="thing", position=0, state="cached", fingerprint=cached.fingerprint
    )
    assert retention.collect(keep=1) == []
    assert (artifacts_dir / cached.storage_key).exists()
    run.state = "succeeded"
    run.save()
    assert [a.pk for a in retention.collect(keep=1)] == [cached.pk]
    assert not (artifacts_dir / cached.storage_key).exists()


def test_init_gc_deletes_for_real_and_refuses_a_bad_keep(
    artifacts_dir: Path, host_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = generation(1, age=9)
    generation(2, age=1, active=True)
    record = verified_record(host_cache, old.artifacts.get())
    record_size = record.stat().st_size
    monkeypatch.setattr(retention, "RECENT", -3600.0)
    out = StringIO()
    call_command("init_gc", "--keep", "1", stdout=out)
    key = old.artifacts.get().storage_key
    assert out.getvalue().splitlines()[-2:] == [
        f"deleted 1 files, {old.artifacts.get().size} bytes",
        f"deleted 1 entries of this host's cache, {record_size} bytes",
    ]
    assert not (artifacts_dir / key).exists()
    assert not record.exists()
    for keep in ("0", str(10**20)):
        with pytest.raises(CommandError) as exc:
            call_command("init_gc", "--keep", keep, stdout=StringIO())
        assert exc.value.returncode == 2
        assert str(exc.value) == (
            f"keep must be from 1 to 10000, not {keep}: the active generation is never deleted"
        )


def test_scratch_files_of_ended_runs_are_removed_at_once() -> None:
    ended = PipelineRun.objects.create(state="failed")
    live = PipelineRun.objects.create(state="running")
    left = storage.new_scratch_path(".npy", run_id=ended.pk)
    left.write_bytes(b"a killed worker's half-written file")
    writing = storage.new_scratch_path(".npy", run_id=live.pk)
    writing.write_bytes(b"being written now")
    generation(1, age=1, active=True)
    retention.collect(keep=1)
    assert not left.exists()
    assert writing.exists()
    writing.unlink()


def finished(run: PipelineRun) -> PipelineRun:
    """Give every phase of the test pipeline's ``run`` a file of its own, and activate it."""
    record_artifacts(run, "a", "b", "c")
    assert outcomes.finish_run(run_id=run.pk) is not None
    return run


@pytest.mark.parametrize("gc", [True, False])
def test_gc_after_activation_deletes_the_files_of_generations_no_longer_kept(
    artifacts_dir: Path, gc: bool
) -> None:
    options = {**settings.INITPIPELINE, "GC_AFTER_ACTIVATION": gc, "KEEP_GENERATIONS": 1}
    with override_settings(INITPIPELINE=options):
        first = finished(live_run(a=done(), b=done(), c=done()))
        old = [artifacts_dir / a.storage_key for a in Artifact.objects.filter(run=first)]
        assert len(old) == 3 and all(path.exists() for path in old)
        second = finished(live_run(a=done(), b=done(), c=done()))
    new = [artifacts_dir / a.storage_key for a in Artifact.objects.filter(run=second)]
    assert Generation.objects.get(is_active=True).run_id == second.pk
    assert all(path.exists() for path in new)
    # The second activation ran init_gc (KEEP_GENERATIONS=1): the first run's files are gone.
    assert [path.exists() for path in old] == [not gc] * 3


def test_a_record_with_a_bad_storage_key_is_skipped_not_a_traceback(
    artifacts_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gens = [generation(n, age=10 - n) for n in range(1, 5)]
    Generation.objects.filter(pk=gens[-1].pk).update(is_active=True)
    bad = gens[0].artifacts.get()
    Artifact.objects.filter(pk=bad.pk).update(storage_key="../../etc/passwd")
    out = StringIO()
    call_command("init_gc", "--keep", "2", stdout=out)
    # The other old generation's file went; the bad record was left, with a warning.
    assert not (artifacts_dir / gens[1].artifacts.get().storage_key).exists()
    assert f"skipped artifact {bad.pk} (../../etc/passwd)" in caplog.text


@pytest.fixture
def host_cache(settings: Any, tmp_path: Path) -> Path:
    """A LOCAL_CACHE_DIR of the test's own."""
    settings.INITPIPELINE = {**settings.INITPIPELINE, "LOCAL_CACHE_DIR": str(tmp_path / "cache")}
    return storage.cache_dir()


def folder_generation(tmp_path: Path, n: int, *, age: int) -> Generation:
    """A new active generation of one directory artifact, ``age`` hours old."""
    source = tmp_path / f"model-{n}"
    source.mkdir()
    (source / "weights.txt").write_text(f"weights {n}")
    gen = publish_generation(model=("dir", source))
    when = timezone.now() - timedelta(hours=age)
    Generation.objects.filter(pk=gen.pk).update(created_at=when, activated_at=when)
    Artifact.objects.filter(generations=gen).update(created_at=when)
    return gen


def cached_for(gen: Generation) -> tuple[str, Artifact]:
    art = gen.artifacts.get()
    return digests.name_part(art.digest), art


def test_a_hosts_cache_keeps_what_the_kept_generations_use_and_loses_the_rest(
    tmp_path: Path, host_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_name, old = cached_for(folder_generation(tmp_path, 1, age=9))
    new_name, new = cached_for(folder_generation(tmp_path, 2, age=1))
    for art in (old, new):
        storage.materialize(art)  # unpacked under dirs/, recorded under verified/
    cache = host_cache
    # A remote storage's copies are named by digest too; and a checkpoint a phase of a run
    # will resume from, copied to this host.
    (cache / f"{old_name}.tar").write_bytes(b"old copy")
    (cache / f"{new_name}.tar").write_bytes(b"new copy")
    checkpoint = "blake3:" + "c" * 64
    live_run(a={"checkpoint": {"key": "k", "digest": checkpoint}})
    (cache / f"{digests.name_part(checkpoint)}.json").write_text("{}")
    monkeypatch.setattr(retention, "RECENT", -3600.0)  # everything counts as made before

    removed = retention.prune_local(keep=1)

    assert sorted(str(p.relative_to(cache)) for p, _ in removed) == [
        f"{old_name}.tar",
        f"dirs/{old_name}",
        f"dirs/{old_name}.json",
        f"dirs/{old_name}.lock",
        f"verified/{old_name}.json",
    ]
    assert {str(p.relative_to(cache)): n for p, n in removed}[f"dirs/{old_name}"] == 9
    assert (cache / "dirs" / new_name).is_dir()
    assert (cache / f"{new_name}.tar").exists()
    assert (cache / "verified" / f"{new_name}.json").exists()
    assert (cache / f"{digests.name_part(checkpoint)}.json").exists()
    # A cache, no more: the storage still has the old generation, and it comes back.
    assert (storage.materialize(old) / "weights.txt").read_text() == "weights 1"


def test_a_hosts_cache_keeps_what_changed_since_the_prune_began(
    tmp_path: Path, host_cache: Path
) -> None:
    old_name, old = cached_for(folder_generation(tmp_path, 1, age=9))
    folder_generation(tmp_path, 2, age=1)
    storage.materialize(old)  # just now: as if a newer generation's copy
    assert retention.prune_local(keep=1) == []
    assert (host_cache / "dirs" / old_name).is_dir()


def test_init_gc_lists_the_hosts_cache_too(
    tmp_path: Path, host_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_name, old = cached_for(folder_generation(tmp_path, 1, age=9))
    folder_generation(tmp_path, 2, age=1)
    storage.materialize(old)
    monkeypatch.setattr(retention, "RECENT", -3600.0)
    out = StringIO()
    call_command("init_gc", "--keep", "1", "--dry-run", stdout=out)
    assert "would delete 4 entries of this host's cache" in out.getvalue()
    assert (host_cache / "dirs" / old_name).is_dir()
    call_command("init_gc", "--keep", "1", stdout=out)
    assert "deleted 4 entries of this host's cache" in out.getvalue()
    assert not (host_cache / "dirs" / old_name).exists()
