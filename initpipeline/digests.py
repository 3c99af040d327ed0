"""Content digests written with their algorithm, as OCI and Docker write them: ``blake3:<hex>``.

What this release publishes (artifacts, checkpoints) is hashed with BLAKE3: the hash is
most of the cost of publishing a large file and of a host's first use of it, and BLAKE3
runs at several times sha256's speed on one core (README, Benchmarks). Artifacts that
earlier releases published keep their ``sha256:<hex>`` digest and verify with sha256. A
phase's fingerprint, a digest of small data, stays a plain sha256 (registry.py).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Protocol

from .exceptions import UnknownDigest

BLAKE3 = "blake3"
SHA256 = "sha256"
#: The algorithm of what this release publishes.
DEFAULT = BLAKE3
#: The algorithms this release verifies, and the length of their hex digest.
HEX_LENGTH = {BLAKE3: 64, SHA256: 64}

#: Read size: 4 MiB stays in the CPU's cache between the read and the hash (16 MiB
#: measured 25 % slower for BLAKE3).
CHUNK = 4 * 1024 * 1024

_HEX = re.compile(r"[0-9a-f]+")

#: In the error a digest of an unknown algorithm raises (health.py tells it apart by this).
UNKNOWN_ALGORITHM = "names a digest algorithm this release does not know"


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def split(digest: str) -> tuple[str, str]:
    """``(algorithm, hex)`` of a digest; raises UnknownDigest for anything this release
    cannot verify (an unknown algorithm, a malformed value)."""
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm not in HEX_LENGTH:
        raise UnknownDigest(
            f"{digest[:80]!r} {UNKNOWN_ALGORITHM} (it knows {', '.join(HEX_LENGTH)}): "
            "a newer release published it? Upgrade initpipeline on this host"
        )
    if len(hexdigest) != HEX_LENGTH[algorithm] or not _HEX.fullmatch(hexdigest):
        raise UnknownDigest(f"{digest[:80]!r} is not a {algorithm} digest")
    return algorithm, hexdigest


def new(algorithm: str = DEFAULT) -> Hasher:
    """A hasher of ``algorithm``.

    BLAKE3 on one thread: on 2 cores beside a busy process, its threads (max_threads=AUTO)
    hashed 4 MiB reads slower than one thread (4.6 against 6.8 GiB/s), and a memory map
    hashed faster only by taking the busy process's core (README, Benchmarks).
    """
    if algorithm == BLAKE3:
        from blake3 import blake3  # A web process that verifies nothing never imports it.

        return blake3()
    if algorithm == SHA256:
        return hashlib.sha256()
    raise UnknownDigest(f"{algorithm!r} {UNKNOWN_ALGORITHM} (it knows {', '.join(HEX_LENGTH)})")


def hasher_for(digest: str) -> Hasher:
    """A hasher of the algorithm ``digest`` was made with."""
    return new(split(digest)[0])


def of(hasher: Hasher, algorithm: str) -> str:
    """The digest ``hasher`` holds, written with its algorithm."""
    return f"{algorithm}:{hasher.hexdigest()}"


def of_file(path: Path | str, algorithm: str = DEFAULT) -> tuple[str, int]:
    """The file's ``(digest, size)``, read in CHUNK pieces into one reused buffer."""
    hasher = new(algorithm)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        # A small file (a checkpoint, a JSON list) needs no 4 MiB buffer.
        buf = bytearray(max(1, min(CHUNK, os.fstat(fh.fileno()).st_size)))
        view = memoryview(buf)
        while n := fh.readinto(buf):
            hasher.update(view[:n])
            size += n
    return of(hasher, algorithm), size


def name_part(digest: str) -> str:
    """The digest as a file or key name: the bare hex for sha256 (the names earlier
    releases gave keys, host records and cached copies, which stay valid), else
    ``<algorithm>-<hex>`` (no colon in a file name)."""
    algorithm, hexdigest = split(digest)
    return hexdigest if algorithm == SHA256 else f"{algorithm}-{hexdigest}"


def short(digest: str) -> str:
    """``blake3:0123456789ab``: the algorithm and the first 12 hex digits, for people."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}:{hexdigest[:12]}"
