"""How each artifact format is written and read; pickles must carry our HMAC signature."""

from __future__ import annotations

import hmac
import json
import pickle
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils.crypto import salted_hmac

from .exceptions import ArtifactSignatureError, PipelineConfigError

CHUNK = 1024 * 1024
SUFFIX = {"json": ".json", "bytes": ".bin", "npy": ".npy", "pickle": ".pkl", "file": ""}
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
    head = len(PICKLE_MAGIC)
    with open(path, "rb") as fh:
        if fh.read(head) != PICKLE_MAGIC:
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
    if fmt == "file":
        return path
    raise PipelineConfigError(f"unknown artifact format {fmt!r}")


def _signed_with(payload: memoryview, secret: str) -> bytes:
    mac = salted_hmac(_SALT, b"", secret=secret, algorithm="sha256")
    mac.update(payload)  # A view: no copy of the payload, unlike force_bytes().
    return mac.digest()


def read_pickle(path: Path) -> Any:
    blob = path.read_bytes()
    head = len(PICKLE_MAGIC)
    if not blob.startswith(PICKLE_MAGIC) or len(blob) < head + 32:
        raise ArtifactSignatureError(f"{path.name} is not a signed initpipeline pickle; refused")
    # A view of the payload: slicing bytes would copy it (twice the pickle in memory).
    signature, payload = blob[head : head + 32], memoryview(blob)[head + 32 :]
    if not any(
        hmac.compare_digest(signature, _signed_with(payload, key)) for key in signing_keys()
    ):
        raise ArtifactSignatureError(
            f"{path.name} has a wrong signature (tampered, or signed with a key that is neither "
            "SECRET_KEY nor in SECRET_KEY_FALLBACKS); refused before unpickling"
        )
    return pickle.loads(payload)  # noqa: S301 - signature checked above
