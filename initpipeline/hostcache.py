"""This host's private folder (``LOCAL_CACHE_DIR``), and its record of the files it verified.

A host hashes a published file once: what it verified is recorded in ``verified/`` by the
file's identity (device, inode, size, mtime, ctime), and a process whose file still shows
that identity takes the record's word for it (storage.verify). A failed check is recorded
too, with the signing keys it was refused with, so that it is not hashed again by every
process, and a host whose keys changed checks again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any

from . import digests, formats
from .conf import settings
from .exceptions import PipelineConfigError

_checked_dirs: set[str] = set()


def cache_dir() -> Path:
    """This host's private folder (``LOCAL_CACHE_DIR``): verified copies and records.

    Refused when another user owns it or others may write it: a file planted there would
    be taken for a verified artifact.
    """
    configured = settings.LOCAL_CACHE_DIR
    default = Path(tempfile.gettempdir()) / f"initpipeline-cache-{os.geteuid()}"
    path = Path(configured) if configured else default
    if str(path) in _checked_dirs:
        return path
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise PipelineConfigError(
            f"LOCAL_CACHE_DIR {path} is a symbolic link: whoever may change the link may "
            "plant files taken for verified artifacts; name the folder itself"
        )
    parent = path.parent.stat()
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        raise PipelineConfigError(
            f"LOCAL_CACHE_DIR {path} is in {path.parent}, which anyone may write without the "
            "sticky bit: another user could replace the folder; choose a private parent"
        )
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        owner = "another user" if st.st_uid != os.geteuid() else "this user"
        raise PipelineConfigError(
            f"LOCAL_CACHE_DIR {path} is owned by {owner} (uid {st.st_uid}) with mode "
            f"{st.st_mode & 0o777:o}: it must belong to this user (uid {os.geteuid()}) and "
            "not be writable by others; set INITPIPELINE['LOCAL_CACHE_DIR'] to a private folder"
        )
    _checked_dirs.add(str(path))
    return path


# -- this host's record of verified files -------------------------------------------------


def identity(st: os.stat_result) -> list[int]:
    """What a file must still show for this host to trust its earlier verdict on it.

    The ctime too: an edit in place whose size and mtime were put back (``os.utime``)
    leaves (device, inode, size, mtime) as they were, but the kernel sets the ctime on
    every change of the file, and user space cannot set it.
    """
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


#: The identity earlier releases recorded: (device, inode, size, mtime), no ctime.
LEGACY_IDENTITY = 4


def key_id(key: str) -> str:
    return hashlib.sha256(b"initpipeline.signer:" + key.encode()).hexdigest()[:16]


def record_path(digest: str, *, create: bool = False) -> Path:
    """``verified/<hex>.json`` for a sha256 digest (earlier releases' records stay
    valid), ``verified/blake3-<hex>.json`` for a BLAKE3 one."""
    folder = cache_dir() / "verified"
    if create:
        folder.mkdir(exist_ok=True)
    return folder / f"{digests.name_part(digest)}.json"


#: digest -> (the record file's identity, its content): a record is read and parsed again
#: only when a process of the host replaced it (os.replace gives it another inode).
_records_read: dict[str, tuple[tuple[int, int, int], dict[str, Any] | None]] = {}

#: The key under which read_record() gives a record's own mtime (when it was written).
WRITTEN = "_written_ns"


def read_record(digest: str) -> dict[str, Any] | None:
    path = record_path(digest)
    try:
        st = path.stat()
    except OSError:
        return None
    seen = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _records_read.get(digest)
    if cached is not None and cached[0] == seen:
        return cached[1]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    record = {**data, WRITTEN: st.st_mtime_ns} if isinstance(data, dict) else None
    _records_read[digest] = (seen, record)
    return record


def write_record(digest: str, path: Path, st: os.stat_result, **fields: Any) -> None:
    target = record_path(digest, create=True)
    tmp = target.with_name(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps({"path": str(path), "identity": identity(st), **fields}))
    os.replace(tmp, target)


def record_holds(record: dict[str, Any] | None, path: Path, st: os.stat_result) -> bool:
    """Whether the host's record speaks of ``path`` as it is now (``st``)."""
    if record is None or record.get("path") != str(path):
        return False
    recorded = record.get("identity")
    if not isinstance(recorded, list):
        return False
    if len(recorded) == LEGACY_IDENTITY:
        # Written by a release before the ctime counted: it holds while nothing changed
        # the file since the record was written (any change sets the file's ctime to the
        # time of the change, after the record's mtime). The hash is not taken again
        # after an upgrade for files nothing touched.
        written = record.get(WRITTEN)
        return (
            recorded == identity(st)[:LEGACY_IDENTITY]
            and isinstance(written, int)
            and st.st_ctime_ns <= written
        )
    return bool(recorded == identity(st))


def verified_here(digest: str, path: Path) -> bool:
    """True when this host verified ``path`` as it is now, with ``digest``."""
    try:
        st = path.stat()
    except OSError:
        return False
    record = read_record(digest)
    return record_holds(record, path, st) and bool(record and record.get("ok"))


def key_ids() -> list[str]:
    """This host's signing keys (SECRET_KEY, then SECRET_KEY_FALLBACKS), as record ids."""
    return [key_id(k) for k in formats.signing_keys()]


def signer_still_trusted(record: dict[str, Any]) -> bool:
    return record.get("signer") in key_ids()


def refused_with_these_keys(record: dict[str, Any]) -> bool | None:
    """For a record of a pickle whose signature this host refused: whether it was refused
    with the keys this host has now (False: check it again). None for other records.

    Records of earlier releases say ``unsigned`` without the keys: checked again once."""
    if "keys" in record:
        return bool(record["keys"] == key_ids())
    return False if record.get("unsigned") else None
