"""The results as markdown (latest.md) and as a chart (latest.png), and writing them out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.figures import PEERS


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Measured {meta['date']} on {meta['machine']} (Python {meta['python']}), demo capped "
        f"to {meta['files']} source files, median of {meta['reps']} runs.",
        "",
        "**1. Time to first response** (Gunicorn start to the first 200 on a page needing no "
        "artifact; ratio to a bare Django project)",
        "",
        "| workers | " + " | ".join(PEERS) + " |",
        "|---|" + "---|" * len(PEERS),
    ]
    for workers, row in results["first_response"].items():
        cells = [f"{row[k]:.2f} s ({row['ratios'][k]:.2f}x)" for k in PEERS]
        lines.append(f"| {workers} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**2. Deploy to ready** (`start_init` to `/init/readyz` 200, against the same "
        "phases in one plain process)",
        "",
        "| broker | initpipeline | plain | overhead | per phase, inside the task (ms) |",
        "|---|---|---|---|---|",
    ]
    for broker, d in results["deploy"].items():
        per = ", ".join(f"{k} {v:+.0f}" for k, v in d["overhead_ms_per_phase_inside"].items())
        lines.append(
            f"| {broker} | {d['initpipeline_s']:.2f} s | {d['plain_s']:.2f} s | "
            f"{d['overhead_ratio'] * 100:+.1f}% | {per} |"
        )
    r = results["redeploy"]
    lines += [
        "",
        f"**3. Unchanged redeploy**: `start_init --wait` with every phase cached: "
        f"{r['start_init_wait_s']:.2f} s.",
        "",
    ]
    m = results["memory"]
    lines += [
        "**4. Memory** (PSS added to 4 Gunicorn workers once each used the "
        f"{m['one_copy_mib']} MiB LSA matrix)",
        "",
        "| loading | added PSS | copies of the matrix |",
        "|---|---|---|",
        f"| initpipeline artifact (mmap) | {m['mmap']['added_pss_mib']} MiB "
        f"| {m['mmap']['copies']} |",
        f"| pickle per worker | {m['pickle']['added_pss_mib']} MiB | {m['pickle']['copies']} |",
        "",
    ]
    h = results["hot_path"]
    lines += [
        f"**5. Hot path**: `artifact(name).get()` {h['artifact_get_ns']:.0f} ns, a module global "
        f"{h['global_ns']:.0f} ns (ratio {h['ratio']:.1f}x).",
        "",
    ]
    t = results["throughput"]
    lines += [
        f"**6. Throughput** ({t['client']}, 2 gthread workers): trivial view "
        f"{t['/bench/trivial']:.0f} req/s, `/init/livez` {t['/init/livez']:.0f} req/s "
        f"({t['ratios']['/init/livez']:.2f}x), `/init/readyz` {t['/init/readyz']:.0f} req/s "
        f"({t['ratios']['/init/readyz']:.2f}x).",
        "",
        "**7. Scale** (filesystem broker, one run each)",
        "",
        "| files | deploy to ready | plain | overhead | phases (initpipeline) |",
        "|---|---|---|---|---|",
    ]
    for files, d in results["scale"].items():
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in d["phases_initpipeline_s"].items())
        lines.append(
            f"| {files} | {d['initpipeline_s']:.1f} s | {d['plain_s']:.1f} s | "
            f"{d['overhead_ratio'] * 100:+.1f}% | {phases} |"
        )
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for i, (workers, row) in enumerate(results["first_response"].items()):
        xs = [j + i * 0.4 for j in range(len(PEERS))]
        ax.bar(xs, [row[k] for k in PEERS], width=0.4, label=f"{workers} workers")
    ax.set_xticks([j + 0.2 for j in range(len(PEERS))], list(PEERS), rotation=15)
    ax.set_ylabel("seconds")
    ax.set_title("Time to first response")
    ax.legend()
    ax = axes[0][1]
    brokers = list(results["deploy"])
    ax.bar(
        [b + "\ninitpipeline" for b in brokers],
        [results["deploy"][b]["initpipeline_s"] for b in brokers],
    )
    ax.bar([b + "\nplain" for b in brokers], [results["deploy"][b]["plain_s"] for b in brokers])
    ax.set_ylabel("seconds")
    ax.set_title("Deploy to ready vs one plain process")
    ax = axes[1][0]
    m = results["memory"]
    ax.bar(
        ["mmap artifact", "pickle per worker"],
        [m["mmap"]["added_pss_mib"], m["pickle"]["added_pss_mib"]],
    )
    ax.axhline(m["one_copy_mib"], color="grey", linestyle="--", label="one copy")
    ax.set_ylabel("MiB PSS added, 4 workers")
    ax.set_title("Memory")
    ax.legend()
    ax = axes[1][1]
    t = results["throughput"]
    keys = ["/bench/trivial", "/init/livez", "/init/readyz"]
    ax.bar(["trivial view", "livez", "readyz"], [t[k] for k in keys])
    ax.set_ylabel("requests/s")
    ax.set_title("Probe throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write(results: dict[str, Any], out: Path) -> None:
    """out/latest.json, latest.md and latest.png; the markdown also goes to stdout."""
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    chart(results, out / "latest.png")
    print(markdown(results))
