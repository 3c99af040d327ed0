"""Publishing artifacts atomically under content-addressed keys; verifying them once per host.

Every process checks an artifact's digest (``blake3:<hex>``, or ``sha256:<hex>`` for what
earlier releases published: digests.py) before its first use, but a host hashes a file
once: what was verified is recorded in ``LOCAL_CACHE_DIR/verified/`` by (device, inode,
size, mtime, ctime), and a process whose file still has that identity takes the record's
word for it. A file changed in place changes its identity (its ctime, which user space
cannot set back, even when its size and mtime were restored), so it is hashed again (and
found corrupt); a failed check is recorded too, so it is not hashed again by every
process. Published files are read-only. The host's folder and its records: hostcache.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.core.files.storage.handler import InvalidStorageError

from . import digests, formats, hostcache
from .conf import settings
from .exceptions import (
    ArtifactCorrupt,
    ArtifactNotReady,
    ArtifactSignatureError,
    PipelineConfigError,
    UnknownDigest,
)
from .hostcache import cache_dir as cache_dir
from .registry import valid_name

if TYPE_CHECKING:
    from .models import Artifact

logger = logging.getLogger("initpipeline")

CHUNK = 4 * 1024 * 1024
READ_ONLY = 0o444


@dataclass(frozen=True)
class Published:
    key: str
    #: ``<algorithm>:<hex>`` (digests.py).
    digest: str
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


def _inside(root: Path, key: str) -> Path:
    """``root/key``, refused unless it stays inside ``root`` with no symlink on the way."""
    path = root / key
    expected = os.path.join(os.path.realpath(root), *Path(key).parts)
    if Path(key).is_absolute() or ".." in Path(key).parts or os.path.realpath(path) != expected:
        raise ArtifactCorrupt(
            f"storage key {key!r} leads outside the artifact folder {root} (a symlink, or "
            "'..'); refused"
        )
    return path


# -- this host's folders ------------------------------------------------------------------


def scratch_dir() -> Path:
    """Where phases write files before publishing: on the storage's filesystem if local."""
    root = _local_root(get_storage())
    base = root / ".partial" if root is not None else cache_dir() / ".partial"
    base.mkdir(parents=True, exist_ok=True)
    return base


def new_scratch_path(
    suffix: str = "", *, run_id: int | None = None, phase_run_id: int | None = None
) -> Path:
    """A fresh scratch path; ``run_id`` lets init_gc remove it once the run has ended, and
    ``phase_run_id`` lets the next copy of the phase remove what a killed one left."""
    prefix = f"r{run_id}-" if run_id is not None else ""
    if run_id is not None and phase_run_id is not None:
        prefix += f"p{phase_run_id}-"
    return scratch_dir() / f"{prefix}{uuid.uuid4().hex}.part{suffix}"


def scratch_run(path: Path) -> int | None:
    """The run a scratch file belongs to (new_scratch_path's ``run_id``), if it says."""
    match = re.match(r"r(\d+)-", path.name)
    return int(match.group(1)) if match else None


# -- hashing and durability -----------------------------------------------------------------


def file_digest(path: Path | str, algorithm: str = digests.DEFAULT) -> tuple[str, int]:
    """The file's ``(digest, size)`` (digests.of_file)."""
    return digests.of_file(path, algorithm)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Below this size a file is hashed and synced one after the other: a thread would cost
#: more than it saves.
OVERLAP_ABOVE = 8 * 1024 * 1024


def hash_and_sync(path: Path, *, copy_from: Path | None = None) -> tuple[str, int]:
    """The file's (digest, size), with the file on disk; ``copy_from``: copy that file to
    ``path`` first.

    Publishing must hash the whole file and fsync it. The hashers, fsync and the kernel's
    copy (sendfile) all release the GIL, so the hash runs in a thread beside the copy and
    the fsync: a 2 GiB file costs the longest of them, not their sum. The hash reads the
    source (or the file just written) from the page cache. Hashing the bytes on their way
    to the file in the writer's own thread measured slower than both.
    """
    source = copy_from or path
    before = source.stat()
    if before.st_size < OVERLAP_ABOVE:
        if copy_from is not None:
            shutil.copyfile(copy_from, path)
        fsync_file(path)
        return file_digest(path)
    result: list[tuple[str, int]] = []
    failure: list[BaseException] = []

    def hash_it() -> None:
        try:
            result.append(file_digest(source))
        except BaseException as exc:  # Raised below, in the caller's thread.
            failure.append(exc)

    hasher = threading.Thread(target=hash_it, name="initpipeline-hash", daemon=True)
    hasher.start()
    try:
        if copy_from is not None:
            shutil.copyfile(copy_from, path)
        fsync_file(path)
    finally:
        hasher.join()
    if failure:
        raise failure[0]
    after = source.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        # Written to while it was hashed: hash what is now at path, the bytes to publish.
        return file_digest(path)
    return result[0]


# -- publishing -----------------------------------------------------------------------------


def publish(path: Path, *, name: str, suffix: str, copy_from: Path | None = None) -> Published:
    """Publish the finished file at ``path`` as artifact ``name``; ``path`` is consumed.

    ``copy_from``: publish a copy of that file (left as it is), made at ``path``. The key
    is ``<name>/blake3-<hex><suffix>`` (digests.name_part): a key never changes content, so
    a reader that found a key in the database can never see a half-written file under it.
    """
    original = path
    try:
        if not valid_name(name):
            raise PipelineConfigError(f"{name!r} is not a valid artifact name (initpipeline.E023)")
        storage = get_storage()
        root = _local_root(storage)
        if root is not None and copy_from is None:
            path = _into_partial(path, root)
        elif root is not None and path.parent != root / ".partial":
            raise ValueError(f"publish(copy_from=...) copies to a scratch path, not {path}")
        # Synced here for both: the local key must never name a file still in the page
        # cache only, and the remote's local copy below is recorded as verified.
        digest, size = hash_and_sync(path, copy_from=copy_from)
        key = f"{name}/{digests.name_part(digest)}{suffix}"
        if root is not None:
            dest = _publish_local(path, root, key, digest, size)
        else:
            key = _publish_remote(path, storage, key, digest, size)
            # This host keeps the bytes it just uploaded as its verified copy: no download.
            dest = cache_dir() / f"{digests.name_part(digest)}{suffix}"
            os.chmod(path, READ_ONLY)
            os.replace(path, dest)
        if suffix != formats.SUFFIX["pickle"]:
            # Hashed just now: this host need not hash it again (a pickle's signature is
            # checked on its first use).
            hostcache.write_record(digest, dest, dest.stat(), ok=True, signer=None)
        return Published(key, digest, size)
    finally:
        # Consumed whatever happened: a failed write (disk full) leaves no partial file.
        path.unlink(missing_ok=True)
        original.unlink(missing_ok=True)


def _into_partial(path: Path, root: Path) -> Path:
    """``path``, copied into the storage's scratch folder unless it is there already: a
    rename into place must not cross filesystems."""
    partial = root / ".partial"
    if path.parent == partial:
        return path
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / f"{uuid.uuid4().hex}.part"
    try:
        shutil.copyfile(path, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    path.unlink(missing_ok=True)
    return tmp


def _publish_local(path: Path, root: Path, key: str, digest: str, size: int) -> Path:
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    dest = _inside(root, key)
    if dest.is_file() and (
        hostcache.verified_here(digest, dest)
        or file_digest(dest, digests.split(digest)[0]) == (digest, size)
    ):
        return dest  # Same bytes published before: idempotent.
    # Anything else under our key (a corrupt copy) is replaced below.
    os.chmod(path, READ_ONLY)
    os.replace(path, dest)  # Atomic on POSIX: the key appears whole or not at all.
    _fsync_dir(dest.parent)
    return dest


def _publish_remote(path: Path, storage: Storage, key: str, digest: str, size: int) -> str:
    existing = _remote_size(storage, key)
    if existing == size and _remote_digest(storage, key, digest) == digest:
        return key  # Same bytes published before: idempotent.
    if existing is not None:
        # A short, corrupt or foreign object under our key: replace it, or save() would
        # put the same content under a second name.
        storage.delete(key)
    with open(path, "rb") as fh:
        saved = storage.save(key, File(fh, name=key))
    if saved != key and _remote_size(storage, key) == size:
        # Another worker saved the same bytes between our look and our save, and the
        # storage does not overwrite (django-storages' file_overwrite=False, Django's
        # get_available_name): it gave ours a suffixed name. The key names the content:
        # keep one object.
        storage.delete(saved)
        return key
    # Storage.save() may pick another name; the record keeps the one it returns.
    return saved


def _remote_size(storage: Storage, key: str) -> int | None:
    if not storage.exists(key):
        return None
    try:
        return storage.size(key)
    except FileNotFoundError:  # Deleted between the two calls.
        return None


def _remote_digest(storage: Storage, key: str, like: str) -> str | None:
    """The digest of the object under ``key``, by the algorithm of digest ``like``."""
    algorithm = digests.split(like)[0]
    hasher = digests.new(algorithm)
    try:
        with storage.open(key, "rb") as src:
            while chunk := src.read(CHUNK):
                hasher.update(chunk)
    except FileNotFoundError:
        return None
    return digests.of(hasher, algorithm)


#: In the reason of a pickle refused for its signature (health.py tells it apart by this).
NO_VALID_SIGNATURE = "has no valid signature"


# -- verifying ------------------------------------------------------------------------------


def _corrupt(artifact: Artifact, path: Path, st: os.stat_result, reason: str) -> ArtifactCorrupt:
    """Record on this host (and on the artifact's records) that the file failed its check."""
    hostcache.write_record(artifact.digest, path, st, ok=False, reason=reason)
    _mark_failed(artifact, reason)
    return ArtifactCorrupt(reason)


def _unsigned(
    artifact: Artifact, path: Path, st: os.stat_result, reason: str
) -> ArtifactSignatureError:
    """Record on this host only that its keys verify none of the pickle's signature.

    A verdict on this host's keys, not on the artifact: a host with a stale SECRET_KEY
    must not mark a good pickle corrupt for every other host and the next start_init
    (issue 21). The record names the keys it was refused with: once this host's keys
    change (the SECRET_KEY set right), the file is checked again.
    """
    hostcache.write_record(
        artifact.digest, path, st, ok=False, reason=reason, keys=hostcache.key_ids()
    )
    return ArtifactSignatureError(reason)


def _mark_failed(artifact: Artifact, reason: str) -> None:
    # Every host and the next start_init must know, not only this process: the records
    # that name these bytes stop counting as a cache, so the next run rebuilds them.
    from django.db import DatabaseError

    from .models import Artifact as ArtifactModel

    if artifact.pk is None:
        return  # Not a record (a path checked on its own).
    # A read-only database user, or no database here: this host's record remains.
    with contextlib.suppress(DatabaseError):
        ArtifactModel.objects.filter(
            storage_key=artifact.storage_key, digest=artifact.digest
        ).update(failed_check=reason[:500])


def _checksum_reason(artifact: Artifact, digest: str, size: int, where: str = "") -> str:
    return (
        f"artifact {artifact.name!r} ({artifact.storage_key}) fails its checksum{where}: "
        f"expected {digests.short(artifact.digest)}… and {artifact.size} bytes, "
        f"found {digests.short(digest)}… and {size} bytes"
    )


def _check_file(artifact: Artifact, path: Path) -> None:
    """Hash ``path`` (and check a pickle's signature); record the verdict for this host."""
    st = path.stat()
    digest, size = file_digest(path, digests.split(artifact.digest)[0])
    if (digest, size) != (artifact.digest, artifact.size):
        raise _corrupt(artifact, path, st, _checksum_reason(artifact, digest, size))
    signer = None
    if artifact.format == "pickle":
        index = formats.pickle_signer(path)
        if index is None:
            reason = (
                f"artifact {artifact.name!r} ({artifact.storage_key}) {NO_VALID_SIGNATURE}: "
                "it verifies with neither SECRET_KEY nor SECRET_KEY_FALLBACKS of this host "
                "(its checksum holds: a key this host lacks, or a forgery)"
            )
            raise _unsigned(artifact, path, st, reason)
        signer = hostcache.key_id(formats.signing_keys()[index])
    # Not changed while it was hashed:
    if hostcache.identity(path.stat()) == hostcache.identity(st):
        hostcache.write_record(artifact.digest, path, st, ok=True, signer=signer)


def _needs_check(artifact: Artifact, path: Path, st: os.stat_result) -> bool:
    """False when this host verified the file as it is now; raises if it found it corrupt."""
    record = hostcache.read_record(artifact.digest)
    if not hostcache.record_holds(record, path, st):
        return True
    assert record is not None
    if not record.get("ok"):
        refused = hostcache.refused_with_these_keys(record)
        if refused is None:
            raise ArtifactCorrupt(str(record.get("reason")))
        if refused:
            raise ArtifactSignatureError(str(record.get("reason")))
        return True  # Refused with other keys than this host has now: check again.
    return artifact.format == "pickle" and not hostcache.signer_still_trusted(record)


def _download(storage: Storage, artifact: Artifact, target: Path) -> None:
    """Copy the artifact's object to ``target``, checking its digest and size on the way."""
    tmp = target.parent / f".{uuid.uuid4().hex}.part"
    algorithm = digests.split(artifact.digest)[0]
    hasher = digests.new(algorithm)
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
                hasher.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        found = digests.of(hasher, algorithm)
        if (found, size) != (artifact.digest, artifact.size):
            reason = _checksum_reason(artifact, found, size, " in storage")
            _mark_failed(artifact, reason)
            raise ArtifactCorrupt(reason)
        os.chmod(tmp, READ_ONLY)
        # Processes of one host may download the same artifact at once: each writes its
        # own temporary name, then renames it into place atomically. The last rename
        # wins; a process that already mapped an earlier copy keeps its (equal) pages.
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def local_path(artifact: Artifact) -> Path:
    """Where this host reads the artifact's file (a remote one: its copy in the cache)."""
    root = _local_root(get_storage())
    if root is not None:
        return _inside(root, artifact.storage_key)
    # Named by content, so one download serves every process, generation and artifact
    # with these bytes on this host.
    return cache_dir() / f"{digests.name_part(artifact.digest)}{Path(artifact.storage_key).suffix}"


def verify(artifact: Artifact) -> Path:
    """The artifact's local path, after checking its size and digest (once per host).

    Raises ArtifactNotReady (no file), ArtifactCorrupt (checksum: marked on its records),
    ArtifactSignatureError (a pickle this host's keys do not verify) or UnknownDigest (a
    digest this release cannot verify); the last two are this host's only.
    """
    storage = get_storage()
    remote = _local_root(storage) is None
    path = local_path(artifact)
    if remote and not path.exists():
        _download(storage, artifact, path)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ArtifactNotReady(
            f"artifact {artifact.name!r} is recorded but its file {artifact.storage_key!r} "
            "is missing from storage"
        ) from exc
    if not _needs_check(artifact, path, st):
        return path
    try:
        _check_file(artifact, path)
    except ArtifactCorrupt:
        if not remote:
            raise
        # A bad copy in the local cache (a crash before its data reached the disk, a
        # stray write) is this host's fault, not the artifact's: download it again.
        os.chmod(path, 0o600)
        path.unlink(missing_ok=True)
        _download(storage, artifact, path)
        _check_file(artifact, path)
    return path


def materialize(artifact: Artifact) -> Path:
    """What a reader of the artifact opens on this host: ``verify()``'s file, or, for a
    directory artifact, its folder, unpacked from the verified archive once per host."""
    path = verify(artifact)
    if artifact.format != "dir":
        return path
    return _unpacked(artifact, path)


def _tree(root: Path) -> dict[str, list[int]]:
    """Every file and folder under ``root``: relative name -> its identity
    (hostcache.identity: the ctime too, so an edit whose mtime was put back still shows)."""
    found = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(top, name)
            found[os.path.relpath(full, root)] = hostcache.identity(os.lstat(full))
    return found


def _unpacked(artifact: Artifact, archive: Path) -> Path:
    """The archive's folder under ``LOCAL_CACHE_DIR/dirs/<digest>``, unpacked once per host.

    A listing of what was unpacked (each file's identity) is kept beside it; a process
    whose folder no longer matches it (a file edited, added or removed) unpacks it again
    from the archive, which ``verify()`` has just checked. Processes of one host unpack
    one at a time (a lock file): the others then find the folder ready.
    """
    import fcntl

    root = cache_dir() / "dirs"
    root.mkdir(exist_ok=True)
    name = digests.name_part(artifact.digest)
    dest = root / name
    listing = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            expected = json.loads(listing.read_text())
        except (OSError, ValueError):
            expected = None
        if dest.is_dir() and expected is not None and _tree(dest) == expected:
            return dest
        if dest.exists():
            logger.warning("unpacking %s again: its folder changed since it was unpacked", dest)
            remove_tree(dest)
        tmp = root / f".{uuid.uuid4().hex}.part"
        try:
            formats.unpack_dir(archive, tmp)
            os.rename(tmp, dest)
        except BaseException:
            remove_tree(tmp)
            raise
        scratch = listing.with_name(f".{uuid.uuid4().hex}.tmp")
        scratch.write_text(json.dumps(_tree(dest)))
        os.replace(scratch, listing)
    return dest


def remove_tree(path: Path) -> None:
    """Remove a read-only unpacked folder (retention.prune_local too)."""
    if not path.exists():
        return
    for top, dirs, _files in os.walk(path):
        os.chmod(top, 0o700)
        for name in dirs:
            os.chmod(os.path.join(top, name), 0o700)
    shutil.rmtree(path, ignore_errors=True)


#: storage key -> local_path(), for problem(): resolving a path (realpath, to refuse a
#: symlink out of the storage) on every probe cost more than the rest of the probe. The
#: file's first use still resolves it: verify() does not use this.
_probed_paths: dict[tuple[str | None, ...], Path] = {}


def _probed_path(artifact: Artifact) -> Path:
    root = _local_root(get_storage())
    where = str(root) if root is not None else settings.LOCAL_CACHE_DIR
    key = (where, artifact.storage_key, artifact.digest)
    path = _probed_paths.get(key)
    if path is None:
        path = _probed_paths[key] = local_path(artifact)
    return path


def problem(artifact: Artifact) -> str | None:
    """What is wrong with the artifact's file on this host, from a stat: cheap enough for
    every readiness probe. None when nothing is known to be wrong (a file this host has
    not verified yet counts as fine: its first use verifies it)."""
    if artifact.failed_check:
        return artifact.failed_check
    try:
        digests.split(artifact.digest)
        path = _probed_path(artifact)
    except ArtifactCorrupt as exc:  # A digest of no algorithm known, a key out of the storage.
        return str(exc)
    remote = _local_root(get_storage()) is None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None if remote else "its file is missing from storage"
    if st.st_size != artifact.size:
        return f"its file changed: {st.st_size} bytes, {artifact.size} published"
    record = hostcache.read_record(artifact.digest)
    if record is None or record.get("path") != str(path):
        return None
    if not hostcache.record_holds(record, path, st):
        return "its file changed since it was verified"
    if record.get("ok") or hostcache.refused_with_these_keys(record) is False:
        return None  # Sound, or refused with keys this host no longer has.
    return str(record.get("reason"))


MISSING = "missing"
CORRUPT = "corrupt"
UNREADABLE = "unreadable"


def assess(artifact: Artifact) -> str | None:
    """What keeps the artifact from serving here: missing, corrupt or unreadable (on this
    host: an OSError, a pickle whose signature none of its keys verify, a digest of an
    algorithm this release does not know); None if sound.

    Its file is verified (once per host); a remote one that this host has no verified
    copy of is not downloaded for this: its object must exist with the recorded size, and
    its first use verifies it. A check that failed anywhere (``failed_check``) counts.
    """
    if artifact.failed_check:
        return CORRUPT
    storage = get_storage()
    if _local_root(storage) is None and not local_path(artifact).exists():
        size = _remote_size(storage, artifact.storage_key)
        if size is None:
            return MISSING
        return None if size == artifact.size else CORRUPT
    try:
        verify(artifact)
    except (ArtifactSignatureError, UnknownDigest):
        # This host's keys verify none of its signature (a stale SECRET_KEY, or a forgery),
        # or this release knows not its digest's algorithm: this host cannot read it, which
        # says nothing of the artifact elsewhere.
        return UNREADABLE
    except ArtifactCorrupt:
        return CORRUPT
    except (ArtifactNotReady, FileNotFoundError):
        return MISSING
    except OSError:
        return UNREADABLE
    return None


def is_valid(artifact: Artifact) -> bool:
    """True when the artifact can serve (see assess())."""
    return assess(artifact) is None
