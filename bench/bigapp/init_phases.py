"""The bench's large artifact: one phase that streams BENCH_BIG_BYTES into an artifact.

It writes through ``ctx.open_artifact`` in 4 MiB blocks, as a phase saving a model or an
index would, and measures its own memory meanwhile: the peak resident set above what it
held when it began (Linux's VmHWM, reset through /proc/self/clear_refs), publishing
included. That goes into a second, small artifact, ``big_memory``.
"""

from __future__ import annotations

import os
from pathlib import Path

from initpipeline import PhaseContext, phase

BLOCK = 4 * 1024 * 1024


def _config() -> dict[str, int]:
    return {"bytes": int(os.environ.get("BENCH_BIG_BYTES", str(64 * 1024 * 1024)))}


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


@phase(produces=["big_model", "big_memory"], config=_config, timeout=3600)
def big_model(ctx: PhaseContext) -> None:
    """Stream the configured number of bytes into ``big_model``; record the peak memory."""
    size = ctx.config["bytes"]
    block = bytearray(os.urandom(BLOCK))
    block[:8] = ctx.run_id.to_bytes(8, "little")  # new bytes in every run (start_init --force)
    baseline = _status_mib("VmRSS:")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        reset = True
    except OSError:
        reset = False
    written = 0
    with ctx.open_artifact("big_model", metadata={"bytes": size}) as fh:
        while written < size:
            chunk = memoryview(block)[: min(BLOCK, size - written)]
            fh.write(chunk)
            written += len(chunk)
            ctx.progress(written, size, f"{written >> 20} MiB")
    peak = _status_mib("VmHWM:")
    ctx.save_json(
        "big_memory",
        {
            "baseline_mib": round(baseline, 1),
            "peak_mib": round(peak, 1),
            "above_baseline_mib": round(peak - baseline, 1),
            "peak_reset": reset,
        },
    )
