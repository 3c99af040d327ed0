"""Figures at the size of our users' artifacts (2 GiB; --quick: 64 MiB).

- publish: ``ctx.save_file`` of a file on the same disk, against ``cp`` of it and against
  ``cp`` followed by an fsync of the copy (what publishing guarantees on top: the bytes
  are on disk before the key names them); the file's sha256 and its BLAKE3 alone beside.
- first get(): four processes of one host, one after the other, each calling
  ``artifact("big_model").get()`` for the first time, with a host record folder of their
  own (LOCAL_CACHE_DIR): the first hashes the file (BLAKE3), the others read its record.
  Beside them, a first process of another host loads the same file recorded with its
  sha256 digest, as a release before BLAKE3 published it.
- unchanged start_init: with the big artifact active, on the host that published it.
- worker memory: the peak resident set of the worker's phase while it streams the
  artifact through ``ctx.open_artifact`` and publishes it, above what it held before
  (bench/bigapp measures it from inside the phase).

Subcommands run in their own processes (python -m bench.big publish|get ...).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Env, log, manage, reset, run_module, worker

GIB = 1024**3
BIG_VAR = ROOT / "var" / "bench-big"


def big_env(size: int, **extra: str) -> Env:
    return Env(
        files=0,
        settings="bench.big_settings",
        var=BIG_VAR,
        extra={"BENCH_BIG_BYTES": str(size), **extra},
    )


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _run_json(env: Env, *args: str) -> Any:
    return run_module("bench.big", env, *args)


def _free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def figures(size: int, reps: int) -> dict[str, Any]:
    """The four figures of a ``size``-byte artifact; skipped (with the reason) without disk."""
    needed = 5 * size + GIB
    free = _free_bytes(ROOT / "var")
    out: dict[str, Any] = {"bytes": size}
    if free < needed:
        out["skipped"] = (
            f"{free / GIB:.1f} GiB free under var/, {needed / GIB:.1f} GiB needed "
            "(the source, its copy, the artifact and a scratch copy)"
        )
        log(f"large artifacts skipped: {out['skipped']}")
        return out
    env = big_env(size)
    reset(env)
    result = manage(env, "migrate", "--noinput")
    if result.returncode:
        raise SystemExit(f"migrate failed:\n{result.stderr}")
    try:
        out["publish"] = publish_vs_cp(env, size, reps)
        out["worker_memory"], out["first_get"], out["unchanged_start_init"] = _pipeline(
            env, size, reps
        )
    finally:
        shutil.rmtree(BIG_VAR, ignore_errors=True)
    return out


def publish_vs_cp(env: Env, size: int, reps: int) -> dict[str, Any]:
    source = BIG_VAR / "source.bin"
    with open(source, "wb") as fh:
        block = os.urandom(4 * 1024 * 1024)
        for _ in range(size // len(block)):
            fh.write(block)
        fh.write(block[: size % len(block)])
    data = _run_json(env, "publish", str(source), str(reps))
    source.unlink()
    out = {k: round(_median(v), 3) for k, v in data.items()}
    out["ratio_to_cp"] = round(out["publish_s"] / out["cp_s"], 2)
    out["ratio_to_cp_fsync"] = round(out["publish_s"] / out["cp_fsync_s"], 2)
    out["runs"] = data
    log(
        f"publish {size / GIB:.2f} GiB: {out['publish_s']:.2f} s, cp {out['cp_s']:.2f} s, "
        f"cp + fsync {out['cp_fsync_s']:.2f} s, sha256 alone {out['sha256_s']:.2f} s, "
        f"BLAKE3 alone {out['blake3_s']:.2f} s"
    )
    return out


def _pipeline(env: Env, size: int, reps: int) -> tuple[dict[str, Any], ...]:
    memory: list[dict[str, Any]] = []
    with worker(env, "big-worker"):
        for rep in range(reps):
            force = ["--force"] if rep else []
            result = manage(env, "start_init", "--wait", *force, timeout=3600)
            if result.returncode:
                raise SystemExit(f"start_init --wait failed:\n{result.stdout}{result.stderr}")
            memory.append(_run_json(env, "memory"))
            manage(env, "init_gc", "--keep", "1")
            log(f"worker memory, rep {rep + 1}: +{memory[-1]['above_baseline_mib']} MiB")
    mem = {
        "above_baseline_mib": round(_median([m["above_baseline_mib"] for m in memory]), 1),
        "baseline_mib": round(_median([m["baseline_mib"] for m in memory]), 1),
        "peak_reset": all(m["peak_reset"] for m in memory),
        "runs_mib": [m["above_baseline_mib"] for m in memory],
    }
    rounds = []
    as_sha256 = []
    sha256 = _run_json(env, "sha256", "big_model")["digest"]
    for _ in range(reps):
        with tempfile.TemporaryDirectory(dir=BIG_VAR, prefix="host-") as host:
            os.chmod(host, 0o700)
            host_env = big_env(size, BENCH_CACHE_DIR=host)
            rounds.append([_run_json(host_env, "get", "big_model")["seconds"] for _ in range(4)])
        with tempfile.TemporaryDirectory(dir=BIG_VAR, prefix="host-") as host:
            os.chmod(host, 0o700)
            host_env = big_env(size, BENCH_CACHE_DIR=host)
            as_sha256.append(_run_json(host_env, "get", "big_model", sha256)["seconds"])
        log(
            "first get() in processes 1-4: "
            + ", ".join(f"{s * 1000:.0f} ms" for s in rounds[-1])
            + f"; process 1 with the file's sha256: {as_sha256[-1] * 1000:.0f} ms"
        )
    first_get = {
        "process_1_s": round(_median([r[0] for r in rounds]), 4),
        "process_1_sha256_s": round(_median(as_sha256), 4),
        "processes_2_4_s": [round(_median([r[i] for r in rounds]), 4) for i in (1, 2, 3)],
        "runs_s": rounds,
        "runs_sha256_s": as_sha256,
    }
    first_get["worst_2_4_ms"] = round(1000 * max(first_get["processes_2_4_s"]), 1)
    times = []
    for _ in range(reps):
        started = time.monotonic()
        result = manage(env, "start_init")
        times.append(time.monotonic() - started)
        if result.returncode or "up to date" not in result.stdout:
            raise SystemExit(f"expected up to date:\n{result.stdout}{result.stderr}")
    unchanged = {"seconds": round(_median(times), 3), "runs_s": [round(t, 3) for t in times]}
    log(f"unchanged start_init with the artifact active: {unchanged['seconds']:.2f} s")
    return mem, first_get, unchanged


# -- the subcommands, each in a process of its own --------------------------------------------


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def _sync() -> None:
    subprocess.run(["sync"], check=False)


def cmd_publish(source: Path, reps: int) -> dict[str, list[float]]:
    """cp, cp + fsync and ctx.save_file of source, reps times after a warm-up round."""
    from initpipeline import storage
    from initpipeline.context import PhaseContext
    from initpipeline.models import PhaseRun
    from initpipeline.registry import get_pipeline

    pipeline = get_pipeline()
    out: dict[str, list[float]] = {
        "cp_s": [],
        "cp_fsync_s": [],
        "sha256_s": [],
        "blake3_s": [],
        "publish_s": [],
        "rss_mib": [],
    }
    copy = source.with_name("copy.bin")
    for rep in range(reps + 1):  # the first round warms the page cache and the imports
        _sync()
        started = time.perf_counter()
        subprocess.run(["cp", str(source), str(copy)], check=True)
        cp = time.perf_counter() - started
        copy.unlink()
        _sync()
        started = time.perf_counter()
        subprocess.run(["cp", str(source), str(copy)], check=True)
        storage.fsync_file(copy)
        cp_fsync = time.perf_counter() - started
        copy.unlink()
        # The floor of publishing, its hash alone: what earlier releases computed (sha256)
        # and what this one does (BLAKE3), of the same file in the page cache.
        hashed = {}
        for algorithm in ("sha256", "blake3"):
            started = time.perf_counter()
            storage.file_digest(source, algorithm)
            hashed[algorithm] = time.perf_counter() - started
        _sync()
        ctx = PhaseContext(
            phase=pipeline["big_model"],
            phase_run=PhaseRun(pk=0, run_id=0, attempt=1),
            pipeline=pipeline,
        )
        baseline = _status_mib("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")
        started = time.perf_counter()
        ctx.save_file("big_model", source)
        published = time.perf_counter() - started
        rss = _status_mib("VmHWM:") - baseline
        # published() wants big_memory too: this is the record of what save_file published.
        pub = ctx._published["big_model"][0]
        Path(storage.get_storage().path(pub.key)).unlink()
        if rep:
            out["cp_s"].append(cp)
            out["cp_fsync_s"].append(cp_fsync)
            out["sha256_s"].append(hashed["sha256"])
            out["blake3_s"].append(hashed["blake3"])
            out["publish_s"].append(published)
            out["rss_mib"].append(rss)
    return out


def cmd_get(name: str, digest: str | None = None) -> dict[str, float]:
    """Seconds of this process's first artifact(name).get(); with ``digest``, of the same
    load of the same file recorded with that digest instead (a sha256: as a release before
    BLAKE3 published it)."""
    from dataclasses import replace

    from initpipeline import artifact, loading

    handle = artifact(name)
    started = time.perf_counter()
    if digest is None:
        handle.get()
    else:
        loading.load(handle, replace(handle.record(), digest=digest), None)
    return {"seconds": time.perf_counter() - started}


def cmd_sha256(name: str) -> dict[str, str]:
    """The sha256 digest of the active artifact ``name``'s file."""
    from initpipeline import artifact, storage

    return {"digest": storage.file_digest(artifact(name).path(), "sha256")[0]}


def cmd_memory() -> dict[str, Any]:
    """What the big phase of the active generation measured of its memory."""
    from initpipeline import artifact

    return dict(artifact("big_memory").get())


def main(argv: list[str]) -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.big_settings")
    django.setup()
    what = argv[0]
    if what == "publish":
        result: Any = cmd_publish(Path(argv[1]), int(argv[2]))
    elif what == "get":
        result = cmd_get(*argv[1:3])
    elif what == "sha256":
        result = cmd_sha256(argv[1])
    elif what == "memory":
        result = cmd_memory()
    else:
        raise SystemExit(f"unknown subcommand {what!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
