"""How each artifact format is written and read; pickles must carry our HMAC signature."""

from __future__ import annotations

import hmac
import io
import json
import os
import pickle
import stat
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.utils.crypto import salted_hmac

from .exceptions import ArtifactSignatureError, PipelineConfigError

CHUNK = 1024 * 1024
SUFFIX = {
    "json": ".json",
    "bytes": ".bin",
    "npy": ".npy",
    "pickle": ".pkl",
    "file": "",
    "dir": ".tar",
}
PICKLE_MAGIC = b"INITPIPELINE-PICKLE-1\n"
_SALT = "initpipeline.formats.pickle"


# The writers below do not fsync: storage.publish() does, beside the hash (hash_and_sync).


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def write_json(path: Path, value: Any) -> None:
    _write(path, json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def write_bytes(path: Path, data: bytes) -> None:
    _write(path, bytes(data))


def write_npy(path: Path, array: Any) -> None:
    import numpy as np

    arr = np.asarray(array)
    if arr.dtype == object:
        raise PipelineConfigError("save_array() refuses object arrays: they need pickle to load")
    with open(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def write_dir(path: Path, source: Path) -> None:
    """A folder as an uncompressed tar whose bytes depend on its content only (names in
    order, no times, owners or umask), so an unchanged folder publishes the same digest.

    Regular files and folders only: a symbolic link (say, into a Hugging Face cache) or a
    device is refused with its name, since what it points to would not travel with it.
    """
    source = Path(source)
    if not source.is_dir():
        raise PipelineConfigError(f"save_dir(): {source} is not a folder")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for top, dirs, files in os.walk(source):
            dirs.sort()
            here = Path(top)
            for name in sorted(dirs) + sorted(files):
                full = here / name
                rel = full.relative_to(source).as_posix()
                st = full.lstat()
                info = tarfile.TarInfo(rel)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    info.size = st.st_size
                    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                    with open(full, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                    raise PipelineConfigError(
                        f"save_dir(): {rel} in {source} is {kind}; a directory artifact holds "
                        "regular files and folders only (copy what a link points to)"
                    )


def unpack_dir(archive: Path, dest: Path) -> None:
    """Extract a ``write_dir`` archive into the new folder ``dest``, read-only.

    Python's "data" filter refuses what a folder artifact never holds (absolute names,
    "..", links out of it, devices), as a second line behind the digest check.
    """
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:  # Python 3.11.0 to 3.11.3
        raise PipelineConfigError("directory artifacts need Python 3.11.4 or newer")
    dest.mkdir()
    with tarfile.open(archive, "r:") as tar:
        tar.extractall(dest, filter=data_filter)
    # Read-only, as published files are: files first, then the folders, deepest first.
    for top, dirs, files in os.walk(dest, topdown=False):
        for name in files:
            os.chmod(os.path.join(top, name), 0o444)
        for name in dirs:
            os.chmod(os.path.join(top, name), 0o555)
    os.chmod(dest, 0o555)


def signing_keys() -> list[str]:
    """SECRET_KEY first, then SECRET_KEY_FALLBACKS: Django's way to rotate keys."""
    return [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]


def _signature(payload: bytes, secret: str) -> bytes:
    return salted_hmac(_SALT, payload, secret=secret, algorithm="sha256").digest()


def write_pickle(path: Path, value: Any) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    signature = _signature(payload, settings.SECRET_KEY)
    with open(path, "wb") as fh:
        # Three writes, not one concatenation: no second copy of the payload in memory.
        fh.write(PICKLE_MAGIC)
        fh.write(signature)
        fh.write(payload)


def pickle_signer(path: Path) -> int | None:
    """Which key signed this pickle: 0 for SECRET_KEY, n for SECRET_KEY_FALLBACKS[n-1].

    None when no key verifies it (tampered, or signed with a key that was rotated out).
    Reads the file in chunks: an HMAC per key, never the whole payload in memory.
    """
    with open(path, "rb") as fh:
        return _signer(fh)


def _signer(fh: BinaryIO) -> int | None:
    """pickle_signer() of the open file, read from its start to its end."""
    if fh.read(len(PICKLE_MAGIC)) != PICKLE_MAGIC:
        return None
    signature = fh.read(32)
    if len(signature) < 32:
        return None
    macs = [salted_hmac(_SALT, b"", secret=key, algorithm="sha256") for key in signing_keys()]
    while chunk := fh.read(CHUNK):
        for mac in macs:
            mac.update(chunk)
    for n, mac in enumerate(macs):
        if hmac.compare_digest(signature, mac.digest()):
            return n
    return None


def read(path: Path, fmt: str) -> Any:
    """Load a verified file of format ``fmt``; arrays are memory-mapped read-only."""
    if fmt == "json":
        with open(path, "rb") as fh:
            return json.load(fh)
    if fmt == "bytes":
        return path.read_bytes()
    if fmt == "npy":
        import numpy as np

        # mmap_mode="r": every process maps the same page-cache pages (one copy in RAM).
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if fmt == "pickle":
        return read_pickle(path)
    if fmt in ("file", "dir"):
        return path  # A directory artifact's path is its unpacked folder (storage.materialize).
    raise PipelineConfigError(f"unknown artifact format {fmt!r}")


class _Stream:
    """An open file, read by ``pickle.Unpickler`` through Python methods.

    ``pickle.loads`` is one C call that holds the GIL from start to end: unpickling a
    5-second model stops every other thread of the process for 5 s (a web worker's
    requests, Gunicorn's heartbeat). The unpickler reads a frame (64 KiB of pickle,
    protocol 4 and up) per call; a Python method there lets the interpreter hand the GIL
    over between frames, so the other threads wait milliseconds, not the whole load.
    """

    def __init__(self, fh: io.BufferedReader) -> None:
        self._fh = fh

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def readinto(self, target: Any) -> int:
        return self._fh.readinto(target)

    def readline(self) -> bytes:
        return self._fh.readline()


def read_pickle(path: Path) -> Any:
    """Unpickle a file that write_pickle() wrote, after checking its signature.

    The file is read twice through one open descriptor, never whole into memory (a
    5 GiB pickle would otherwise need 5 GiB more while it loads): once for the HMAC, then
    by the unpickler. Between the two, only a process that may write the file itself could
    change it: published files are read-only and owned by the pipeline's user, who can
    change its code just as well.
    """
    with open(path, "rb") as fh:
        if _signer(fh) is None:
            fh.seek(0)
            head = fh.read(len(PICKLE_MAGIC) + 32)
            if not head.startswith(PICKLE_MAGIC) or len(head) < len(PICKLE_MAGIC) + 32:
                raise ArtifactSignatureError(
                    f"{path.name} is not a signed initpipeline pickle; refused"
                )
            raise ArtifactSignatureError(
                f"{path.name} has a wrong signature (tampered, or signed with a key that is "
                "neither SECRET_KEY nor in SECRET_KEY_FALLBACKS); refused before unpickling"
            )
        fh.seek(len(PICKLE_MAGIC) + 32)
        return pickle.Unpickler(_Stream(fh)).load()  # noqa: S301 - signature checked above
