"""Nanoseconds per artifact(name).get() after warm-up, against reading a module global."""

from __future__ import annotations

import json
import os
import timeit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

import django  # noqa: E402

django.setup()

from initpipeline import artifact  # noqa: E402

HANDLE = artifact("lsa_docs")
GLOBAL = HANDLE.get()  # warm-up: loaded and verified once


def read_global() -> object:
    return GLOBAL


def main() -> None:
    n = 200_000
    get = min(timeit.repeat(HANDLE.get, number=n, repeat=5)) / n * 1e9
    glob = min(timeit.repeat(read_global, number=n, repeat=5)) / n * 1e9
    print(
        json.dumps(
            {
                "artifact_get_ns": round(get, 1),
                "global_ns": round(glob, 1),
                "ratio": round(get / glob, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
