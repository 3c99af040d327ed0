"""How each artifact format is written and read; pickles must carry our HMAC signature."""

from __future__ import annotations

import hmac
import json
import os
import pickle
from pathlib import Path
from typing import Any

from django.utils.crypto import salted_hmac

from .exceptions import ArtifactSignatureError, PipelineConfigError

SUFFIX = {"json": ".json", "bytes": ".bin", "npy": ".npy", "pickle": ".pkl", "file": ""}
PICKLE_MAGIC = b"INITPIPELINE-PICKLE-1\n"
_SALT = "initpipeline.formats.pickle"


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


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
        fh.flush()
        os.fsync(fh.fileno())


def _signature(payload: bytes) -> bytes:
    return salted_hmac(_SALT, payload, algorithm="sha256").digest()


def write_pickle(path: Path, value: Any) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    _write(path, PICKLE_MAGIC + _signature(payload) + payload)


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
    if fmt == "file":
        return path
    raise PipelineConfigError(f"unknown artifact format {fmt!r}")


def read_pickle(path: Path) -> Any:
    blob = path.read_bytes()
    head = len(PICKLE_MAGIC)
    if not blob.startswith(PICKLE_MAGIC) or len(blob) < head + 32:
        raise ArtifactSignatureError(f"{path.name} is not a signed initpipeline pickle; refused")
    signature, payload = blob[head : head + 32], blob[head + 32 :]
    if not hmac.compare_digest(signature, _signature(payload)):
        raise ArtifactSignatureError(
            f"{path.name} has a wrong signature (tampered, or signed with another SECRET_KEY); "
            "refused before unpickling"
        )
    return pickle.loads(payload)  # noqa: S301 - signature checked above
