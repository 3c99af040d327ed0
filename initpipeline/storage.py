"""Publishing artifacts atomically under content-addressed keys, and verifying them."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.core.files.storage.handler import InvalidStorageError

from .conf import settings
from .exceptions import ArtifactCorrupt, ArtifactNotReady, PipelineConfigError

if TYPE_CHECKING:
    from .models import Artifact

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Published:
    key: str
    sha256: str
    size: int


def get_storage() -> Storage:
    """The Django storage that holds the artifacts (``STORAGES[INITPIPELINE["STORAGE"]]``)."""
    alias = settings.STORAGE
    try:
        return storages[alias]
    except (InvalidStorageError, ImproperlyConfigured) as exc:
        raise PipelineConfigError(
            f"settings.STORAGES has no usable {alias!r} entry for the artifacts: {exc}"
        ) from exc


def _local_root(storage: Storage) -> Path | None:
    # Only a FileSystemStorage lets us rename into place; S3 and friends get
    # content-addressed keys and a pointer flip in the database instead.
    if isinstance(storage, FileSystemStorage):
        return Path(storage.location)
    return None


def scratch_dir() -> Path:
    """Where phases write files before publishing: on the same filesystem when possible."""
    root = _local_root(get_storage())
    base = root / ".partial" if root is not None else Path(tempfile.gettempdir()) / "initpipeline"
    base.mkdir(parents=True, exist_ok=True)
    return base


def new_scratch_path(suffix: str = "") -> Path:
    return scratch_dir() / f"{uuid.uuid4().hex}.part{suffix}"


def file_sha256(path: Path | str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(path: Path, *, name: str, suffix: str) -> Published:
    """Publish the finished file at ``path`` as artifact ``name``; ``path`` is consumed.

    The key is ``<name>/<sha256><suffix>``: a key never changes content, so a reader
    that found a key in the database can never see a half-written file under it.
    """
    sha, size = file_sha256(path)
    key = f"{name}/{sha}{suffix}"
    storage = get_storage()
    root = _local_root(storage)
    if root is not None:
        dest = root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and file_sha256(dest) == (sha, size):
            path.unlink(missing_ok=True)  # Same bytes published before: idempotent.
            return Published(key, sha, size)
        if path.parent != root / ".partial":
            tmp = root / ".partial" / f"{uuid.uuid4().hex}.part"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp)
            path.unlink(missing_ok=True)
            path = tmp
        fsync_file(path)
        os.replace(path, dest)  # Atomic on POSIX: the key appears whole or not at all.
        _fsync_dir(dest.parent)
        return Published(key, sha, size)
    try:
        existing = _remote_size(storage, key)
        if existing == size:
            return Published(key, sha, size)  # Same bytes published before: idempotent.
        if existing is not None:
            # A short or foreign object under our key: replace it, or save() would
            # put the same content under a second name.
            storage.delete(key)
        with open(path, "rb") as fh:
            saved = storage.save(key, File(fh, name=key))
    finally:
        path.unlink(missing_ok=True)
    if saved != key and _remote_size(storage, key) == size:
        # Another worker saved the same bytes between our look and our save, and the
        # storage does not overwrite (django-storages' file_overwrite=False, Django's
        # get_available_name): it gave ours a suffixed name. The key names the content:
        # keep one object.
        storage.delete(saved)
        return Published(key, sha, size)
    # Storage.save() may pick another name; the record keeps the one it returns.
    return Published(saved, sha, size)


def _remote_size(storage: Storage, key: str) -> int | None:
    if not storage.exists(key):
        return None
    try:
        return storage.size(key)
    except FileNotFoundError:  # Deleted between the two calls.
        return None


def cache_dir() -> Path:
    """Where this host keeps verified copies of remote artifacts (``LOCAL_CACHE_DIR``)."""
    configured = settings.LOCAL_CACHE_DIR
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / "initpipeline-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download(storage: Storage, artifact: Artifact, target: Path) -> None:
    """Copy the artifact's object to ``target``, checking its sha256 and size on the way."""
    tmp = target.parent / f".{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    size = 0
    try:
        try:
            src = storage.open(artifact.storage_key, "rb")
        except FileNotFoundError as exc:
            raise ArtifactNotReady(
                f"artifact {artifact.name!r} is recorded but its object "
                f"{artifact.storage_key!r} is missing from storage"
            ) from exc
        with src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        if (digest.hexdigest(), size) != (artifact.sha256, artifact.size):
            raise ArtifactCorrupt(
                f"artifact {artifact.name!r} ({artifact.storage_key}) fails its checksum "
                f"in storage: expected sha256 {artifact.sha256[:12]}… and {artifact.size} "
                f"bytes, found {digest.hexdigest()[:12]}… and {size} bytes"
            )
        # Processes of one host may download the same artifact at once: each writes its
        # own temporary name, then renames it into place atomically. The last rename
        # wins; a process that already mapped an earlier copy keeps its (equal) pages.
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _local_path(artifact: Artifact) -> tuple[Path, bool]:
    """The local path of the artifact's file, and whether it was checked just now."""
    storage = get_storage()
    root = _local_root(storage)
    if root is not None:
        path = root / artifact.storage_key
        if not path.exists():
            raise ArtifactNotReady(
                f"artifact {artifact.name!r} is recorded but its file {artifact.storage_key!r} "
                "is missing from storage"
            )
        return path, False
    # Named by content, so one download serves every process, generation and artifact
    # with these bytes on this host.
    target = cache_dir() / f"{artifact.sha256}{Path(artifact.storage_key).suffix}"
    if target.exists():
        return target, False
    _download(storage, artifact, target)
    return target, True


def verify(artifact: Artifact) -> Path:
    """Return the artifact's local path after checking its size and sha256."""
    path, checked = _local_path(artifact)
    if checked:
        return path
    sha, size = file_sha256(path)
    if (sha, size) == (artifact.sha256, artifact.size):
        return path
    if _local_root(get_storage()) is None:
        # A bad copy in the local cache (a crash before its data reached the disk, a
        # stray write) is this host's fault, not the artifact's: download it again.
        path.unlink(missing_ok=True)
        return _local_path(artifact)[0]
    raise ArtifactCorrupt(
        f"artifact {artifact.name!r} ({artifact.storage_key}) fails its checksum: "
        f"expected sha256 {artifact.sha256[:12]}… and {artifact.size} bytes, "
        f"found {sha[:12]}… and {size} bytes"
    )


def is_valid(artifact: Artifact) -> bool:
    try:
        verify(artifact)
    except (ArtifactCorrupt, ArtifactNotReady, OSError):
        return False
    return True
