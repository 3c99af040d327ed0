"""The results as markdown (latest.md) and as a chart (latest.png), and writing them out.

Every section renders what the results hold, so a partial run (--only) still reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import monitoring, serving, shardfigures
from bench.figures import PEERS
from bench.overhead import CAUSE_TEXT, CAUSES

GIB = 1024**3


def _size(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / 1024**2:g} MiB"


def _files(key: str) -> str:
    return "all (the demo's default)" if key == "0" else key


def top_causes(d: dict[str, Any], n: int = 4) -> str:
    """The largest causes of a deploy's difference to the plain process, largest first."""
    causes = sorted(d["causes_s"].items(), key=lambda kv: -abs(kv[1]))
    return ", ".join(f"{k} {v:+.2f} s" for k, v in causes[:n])


def _amdahl(results: dict[str, Any]) -> str:
    """Why two processes cannot halve the demo: the share of it that is not sharded."""
    why = "only the first phase is sharded; the phases after it run on one process"
    plain = results.get("deploy", {}).get("filesystem", {}).get("phases_plain_s")
    if not plain or "collect_docstrings" not in plain:
        return why
    total = sum(plain.values())
    serial = total - plain["collect_docstrings"]
    best = (serial + plain["collect_docstrings"] / 2) / total
    return (
        f"{why}: {serial:.1f} s of the plain process's {total:.1f} s (the SVD, one BLAS "
        f"thread, and TF-IDF), so even free orchestration gives {best:.2f}×"
    )


# -- the goals of issue 15 -----------------------------------------------------------------


def _hashes(p: dict[str, Any]) -> str:
    """The hash of the file alone: sha256 and BLAKE3 (results before BLAKE3: sha256 only)."""
    if "blake3_s" in p:
        return f"sha256 alone {p['sha256_s']:.2f} s, BLAKE3 alone {p['blake3_s']:.2f} s"
    return f"sha256 alone {p['hash_s']:.2f} s"


def _publish_why(p: dict[str, Any]) -> str:
    """Why publishing missed 1.3× `cp`, from its parts."""
    why = (
        f"`cp` stops at the page cache; publishing hashes ({_hashes(p)}) beside the copy and "
        f"the fsync (`cp` + fsync {p['cp_fsync_s']:.2f} s)"
    )
    floor = max(p["cp_fsync_s"], p.get("blake3_s", p.get("hash_s", 0.0)))
    if p["publish_s"] > 1.3 * floor:
        above = p["publish_s"] - floor
        return why + f": {above:.2f} s above the longest of them, not explained yet"
    return why + ", so it takes the longest of them"


def goals(results: dict[str, Any]) -> list[list[str]]:
    """Rows of (figure, goal, measured, met, reason when missed, command)."""
    rows: list[list[str]] = []

    def row(figure: str, goal: str, measured: str, met: bool, why: str, only: str) -> None:
        rows.append([figure, goal, measured, "yes" if met else "**no**", "" if met else why, only])

    big = results.get("big", {})
    size = _size(big.get("bytes", 2 * GIB))
    if "publish" in big:
        p = big["publish"]
        row(
            f"publish a {size} artifact vs `cp` of the file on the same disk",
            "≤ 1.3×",
            f"{p['publish_s']:.2f} s vs {p['cp_s']:.2f} s: {p['ratio_to_cp']:.2f}× "
            f"(vs `cp` + fsync {p['cp_fsync_s']:.2f} s: {p['ratio_to_cp_fsync']:.2f}×)",
            p["ratio_to_cp"] <= 1.3,
            _publish_why(p),
            "big",
        )
        g = big["first_get"]
        if "process_1_sha256_s" in g:
            row(
                f"first `get()` of a {size} artifact in the host's first process",
                "≤ 0.5 s",
                f"{g['process_1_s']:.2f} s (BLAKE3; the same file with its sha256, as "
                f"published before BLAKE3: {g['process_1_sha256_s']:.2f} s)",
                g["process_1_s"] <= 0.5,
                "it hashes the whole file from the page cache; see 8.",
                "big",
            )
        row(
            f"first `get()` of a {size} artifact in processes 2..4 of a host, after the "
            "1st verified it",
            "≤ 50 ms each",
            f"{', '.join(f'{s * 1000:.0f}' for s in g['processes_2_4_s'])} ms "
            f"(the 1st, which hashes: {g['process_1_s']:.2f} s)",
            g["worst_2_4_ms"] <= 50,
            "",
            "big",
        )
        u = big["unchanged_start_init"]
        row(
            f"unchanged `start_init` with {size} of active artifacts",
            "< 2 s",
            f"{u['seconds']:.2f} s",
            u["seconds"] < 2,
            "",
            "big",
        )
        m = big["worker_memory"]
        row(
            f"worker peak RSS while saving a {size} artifact, above its baseline",
            "≤ 200 MiB",
            f"{m['above_baseline_mib']:.1f} MiB",
            m["above_baseline_mib"] <= 200,
            "",
            "big",
        )
    elif big.get("skipped"):
        row(f"large artifacts ({size})", "", "skipped", False, big["skipped"], "big")
    if "flood" in results:
        f = results["flood"]
        row(
            "deploy to ready while `wrk` hammers the warming-up page vs without",
            "≤ 1.05×",
            f"{f['flooded_s']:.2f} s vs {f['quiet_s']:.2f} s: {f['ratio']:.2f}×",
            f["ratio"] <= 1.05,
            f"CPU: the web server kept {f['web_cpu_cores']:.2f} cores busy answering "
            f"{f['answers_per_s']:.0f} requests/s (none of them queries the database), "
            "beside wrk itself, on the cores the phases run on",
            "flood",
        )
    if "warmup_rates" in results:
        w = results["warmup_rates"]
        worst = min(w["ratios"].values())
        row(
            "503 answers/s during the warm-up vs a trivial view",
            "≥ 0.8×",
            f"readyz {w['/init/readyz']:.0f}/s ({w['ratios']['/init/readyz']:.2f}×), "
            f"warming-up page {w['/']:.0f}/s ({w['ratios']['/']:.2f}×), "
            f"trivial {w['/bench/trivial']:.0f}/s",
            worst >= 0.8,
            "each 503 still costs what the trivial view's 200 does not: the look at what is "
            "missing, three more headers, and Django's log record of a 5xx answer, which the "
            "README promises to keep (at INFO); the body itself is built once per look at "
            "the progress",
            "warmup_rates",
        )
    if "startup" in results:
        s = results["startup"]
        r = s["ratios"]
        row(
            "time to first response vs the literal `startproject` and vs the minimal project",
            "≤ 1.2×",
            f"{s['initpipeline']:.2f} s vs {s['startproject']:.2f} s "
            f"({r['to_startproject']:.2f}×) and {s['minimal']:.2f} s ({r['to_minimal']:.2f}×)",
            max(r.values()) <= 1.2,
            "the demo's own apps, middleware (WhiteNoise) and URLs, beside initpipeline's",
            "startup",
        )
    for key, d in results.get("scale", {}).items():
        ratio = 1 + d["overhead_ratio"]
        row(
            f"deploy to ready vs plain process, demo at {_files(key)} files",
            "≤ 1.10×, each cause listed",
            f"{d['initpipeline_s']:.1f} s vs {d['plain_s']:.1f} s: {ratio:.2f}×; {top_causes(d)}",
            ratio <= 1.10,
            "see the causes",
            "scale",
        )
    shards = results.get("shards", {})
    if "deploy" in shards:
        d = shards["deploy"]
        row(
            f"demo deploy to ready ({_files(str(d['files']))} files, first phase in 4 shards), "
            "2 worker processes vs 1",
            f"≤ {d['goal']}×",
            f"{d['two_s']:.1f} s vs {d['one_s']:.1f} s: {d['ratio']:.2f}×",
            d["ratio"] <= d["goal"],
            _amdahl(results),
            "shards",
        )
    cost = shards.get("cost", {})
    if "counts" in cost:
        database = "PostgreSQL" if cost["database"] == "postgresql" else "SQLite"
        for n, c in cost["counts"].items():
            row(
                f"orchestration per shard on Redis and {database} ({n} empty shards vs 1)",
                f"≤ {cost['goal_ms']} ms",
                f"{c['per_shard_ms']:.1f} ms",
                c["per_shard_ms"] <= cost["goal_ms"],
                "a shard's success costs the same queries at every count (the row below): "
                "what grows with the count is outside them, not found yet",
                "shards",
            )
        q = cost["queries"]
        row(
            f"queries of one shard's success at {', '.join(q)} shards",
            "constant",
            ", ".join(f"{v['queries']} ({v['rows']} rows read)" for v in q.values()),
            shardfigures.queries_constant(cost),
            "see 9.",
            "shards",
        )
    elif "per_shard_ms" in cost:  # results of a release before the 1,000-shard figure
        row(
            f"orchestration per shard on Redis ({cost['count']} empty shards vs 1)",
            f"≤ {cost['goal_ms']} ms",
            f"{cost['per_shard_ms']:.1f} ms",
            cost["per_shard_ms"] <= cost["goal_ms"],
            "see 9.",
            "shards",
        )
    elif cost.get("skipped"):
        row("orchestration per shard on Redis", "", "skipped", False, cost["skipped"], "shards")
    for figure, goal, measured, met, why in serving.goal_rows(results.get("serving", {})):
        row(figure, goal, measured, met, why, "serving")
    for figure, goal, measured, met, why in monitoring.goal_rows(results.get("monitoring", {})):
        row(figure, goal, measured, met, why, "monitoring")
    return rows


# -- markdown --------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _causes_table(deploys: dict[str, dict[str, Any]]) -> list[str]:
    names = list(deploys)
    rows = []
    for cause in CAUSES:
        cells = [f"{deploys[n]['causes_s'].get(cause, 0.0):+.2f} s" for n in names]
        rows.append([f"{cause}: {CAUSE_TEXT[cause]}", *cells])
    total = [f"**{deploys[n]['initpipeline_s'] - deploys[n]['plain_s']:+.2f} s**" for n in names]
    rows.append(["**total** (initpipeline minus plain)", *total])
    return _table(["cause", *names], rows)


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines: list[str] = []
    if meta:
        load = ""
        if "load_before" in meta:
            load = (
                f" Load average {meta['load_before'][0]:.1f} at the start, "
                f"{meta['load_after'][0]:.1f} at the end."
            )
        groups: dict[tuple[Any, ...], list[str]] = {}
        for name, m in meta.get("remeasured", {}).items():
            when = (m["date"], m["reps"], m["load_before"][0], m["load_after"][0])
            groups.setdefault(when, []).append(f"`{name}`")
        again = "".join(
            f" Measured again with --only on {date}, median of {reps} runs (load average "
            f"{before:.1f} to {after:.1f}): {', '.join(names)}."
            for (date, reps, before, after), names in groups.items()
        )
        lines += [
            f"Measured {meta['date']} on {meta['machine']} (Python {meta['python']}), demo "
            f"capped to {meta['files']} source files, median of {meta['reps']} runs"
            f"{' (--quick)' if meta.get('quick') else ''}.{load}{again}",
            "",
        ]
    rows = goals(results)
    if rows:
        lines += [
            "**Goals** (issues 14, 15, 20, 23 and 24; `python -m bench --only FIGURE` measures "
            "one again)",
            "",
        ]
        lines += _table(
            ["figure", "goal", "measured", "met", "why not", "FIGURE"],
            [[*r[:5], f"`{r[5]}`"] for r in rows],
        )
        lines.append("")

    if "first_response" in results:
        lines += [
            "**1. Time to first response** (Gunicorn start to the first 200 on a page needing "
            "no artifact; ratio to a bare Django project)",
            "",
            "| workers | " + " | ".join(PEERS) + " |",
            "|---|" + "---|" * len(PEERS),
        ]
        for workers, row in results["first_response"].items():
            cells = [f"{row[k]:.2f} s ({row['ratios'][k]:.2f}x)" for k in PEERS]
            lines.append(f"| {workers} | " + " | ".join(cells) + " |")
        lines.append("")
    if "startup" in results:
        s = results["startup"]
        lines += [
            f"**1b. Against startproject** (`{s['url']}`, {s['workers']} workers): literal "
            f"`django-admin startproject` {s['startproject']:.3f} s, the minimal project "
            f"{s['minimal']:.3f} s, initpipeline's demo {s['initpipeline']:.3f} s "
            f"({s['ratios']['to_startproject']:.2f}x and {s['ratios']['to_minimal']:.2f}x).",
            "",
        ]
    if "deploy" in results:
        lines += [
            "**2. Deploy to ready** (`start_init` to `/init/readyz` 200, against the same "
            "phases in one plain process)",
            "",
            "| broker | initpipeline | plain | overhead | largest causes |",
            "|---|---|---|---|---|",
        ]
        for broker, d in results["deploy"].items():
            lines.append(
                f"| {broker} | {d['initpipeline_s']:.2f} s | {d['plain_s']:.2f} s | "
                f"{d['overhead_ratio'] * 100:+.1f}% | {top_causes(d)} |"
            )
        lines.append("")
    if "redeploy" in results:
        r = results["redeploy"]
        lines += [
            f"**3. Unchanged redeploy**: `start_init --wait` with every phase cached: "
            f"{r['start_init_wait_s']:.2f} s.",
            "",
        ]
    if "memory" in results:
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
    if "hot_path" in results:
        h = results["hot_path"]
        lines += [
            f"**5. Hot path**: `artifact(name).get()` {h['artifact_get_ns']:.0f} ns, a module "
            f"global {h['global_ns']:.0f} ns (ratio {h['ratio']:.1f}x).",
            "",
        ]
    if "throughput" in results:
        t = results["throughput"]
        lines += [
            f"**6. Throughput** ({t['client']}, 2 gthread workers, ready): trivial view "
            f"{t['/bench/trivial']:.0f} req/s, `/init/livez` {t['/init/livez']:.0f} req/s "
            f"({t['ratios']['/init/livez']:.2f}x), `/init/readyz` {t['/init/readyz']:.0f} "
            f"req/s ({t['ratios']['/init/readyz']:.2f}x).",
            "",
        ]
    if "warmup_rates" in results:
        w = results["warmup_rates"]
        lines += [
            "**6b. During the warm-up** (a run enqueued, no worker: every answer but the "
            f"trivial view's is a 503; the best of {len(w['runs']['/'])} runs of each, see "
            f"bench/warmup.py): trivial view {w['/bench/trivial']:.0f} req/s, "
            f"`/init/readyz` {w['/init/readyz']:.0f} req/s ({w['ratios']['/init/readyz']:.2f}x), "
            f"the warming-up page {w['/']:.0f} req/s ({w['ratios']['/']:.2f}x).",
            "",
        ]
    if "flood" in results:
        f = results["flood"]
        lines += [
            f"**6c. A crowd during the deploy** ({f['client']} on `{f['page']}` from before "
            f"`start_init` to ready): {f['flooded_s']:.2f} s against {f['quiet_s']:.2f} s "
            f"without ({f['ratio']:.2f}x); the crowd got {f['answers_per_s']:.0f} answers/s "
            f"and kept the web server on {f['web_cpu_cores']:.2f} cores.",
            "",
        ]
    if "scale" in results or "deploy" in results:
        deploys = {
            **{
                f"{b} ({results['meta']['files']} files)": d
                for b, d in results.get("deploy", {}).items()
            },
            **{f"{_files(k)} files": d for k, d in results.get("scale", {}).items()},
        }
        lines += [
            "**7. Deploy to ready above the plain process, by cause** (seconds, median of "
            "the runs; filesystem broker unless said)",
            "",
            *_causes_table(deploys),
            "",
        ]
    big, shards = results.get("big", {}), results.get("shards", {})
    if "publish" in big:
        p, g = big["publish"], big["first_get"]
        m, u = big["worker_memory"], big["unchanged_start_init"]
        lines += [
            f"**8. A {_size(big['bytes'])} artifact**",
            "",
            "| figure | initpipeline | against |",
            "|---|---|---|",
            f"| publish (`ctx.save_file` of a file on the same disk) | {p['publish_s']:.2f} s "
            f"| `cp` {p['cp_s']:.2f} s, `cp` + fsync {p['cp_fsync_s']:.2f} s, {_hashes(p)} |",
            f"| first `get()`, processes 1 / 2 / 3 / 4 of a host | {g['process_1_s'] * 1000:.0f}"
            f" / {' / '.join(f'{s * 1000:.1f}' for s in g['processes_2_4_s'])} ms | the 1st "
            "hashes the file (BLAKE3), the others read its record"
            + (
                f"; the same file with its sha256 digest: {g['process_1_sha256_s'] * 1000:.0f} ms"
                if "process_1_sha256_s" in g
                else ""
            )
            + " |",
            f"| unchanged `start_init` | {u['seconds']:.2f} s | |",
            f"| worker peak RSS while streaming and publishing it | +{m['above_baseline_mib']:.1f}"
            f" MiB | baseline {m['baseline_mib']:.0f} MiB |",
            "",
        ]
    elif big.get("skipped"):
        lines += [f"**8. Large artifacts**: skipped: {big['skipped']}.", ""]
    if "deploy" in shards:
        lines += [
            "**9. Sharded phases** (the demo's first phase in 4 shards; empty shards of "
            "tests/shardapp on Redis and PostgreSQL)",
            "",
            shardfigures.markdown(shards),
        ]
    if "serving" in results:
        lines += [
            "**10. Serving: no request waits for a load** (in-request: the first request of "
            "each worker loads, as before; background: initpipeline's Gunicorn hooks)",
            "",
            serving.markdown(results["serving"]),
        ]
    if "monitoring" in results:
        lines += [
            "**11. Monitoring** (a scrape of the records' series; a deploy traced over "
            "OTLP/HTTP against one not traced)",
            "",
            monitoring.markdown(results["monitoring"]),
        ]
    if "seconds" in meta:
        spent = ", ".join(f"{k} {v:.0f} s" for k, v in meta["seconds"].items())
        lines += [f"Time spent: {spent}.", ""]
    return "\n".join(lines)


# -- the chart -------------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 2, figsize=(13, 17))
    ax = axes[0][0]
    if "first_response" in results:
        for i, (workers, row) in enumerate(results["first_response"].items()):
            xs = [j + i * 0.4 for j in range(len(PEERS))]
            ax.bar(xs, [row[k] for k in PEERS], width=0.4, label=f"{workers} workers")
        ax.set_xticks([j + 0.2 for j in range(len(PEERS))], list(PEERS), rotation=15)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.legend()
    ax.set_title("Time to first response, against the peers")

    ax = axes[0][1]
    if "startup" in results:
        s = results["startup"]
        names = ["startproject", "minimal", "initpipeline"]
        ax.bar(names, [s[n] for n in names], color=["grey", "grey", "tab:blue"])
        ax.axhline(1.2 * s["startproject"], color="tab:red", linestyle="--", label="goal: 1.2x")
        ax.set_ylabel("seconds")
        ax.legend()
    ax.set_title("Time to first response, against startproject")

    deploys: dict[str, dict[str, Any]] = {}
    for b, d in results.get("deploy", {}).items():
        deploys[f"{b}\n{results['meta']['files']} files"] = d
    for k, d in results.get("scale", {}).items():
        deploys[f"{'all' if k == '0' else k}\nfiles"] = d
    ax = axes[1][0]
    if deploys:
        xs = range(len(deploys))
        ax.bar(
            [x - 0.2 for x in xs],
            [d["initpipeline_s"] for d in deploys.values()],
            0.4,
            label="initpipeline",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [d["plain_s"] for d in deploys.values()],
            0.4,
            label="plain process",
        )
        ax.set_xticks(list(xs), list(deploys))
        ax.set_ylabel("seconds")
        ax.legend()
    ax.set_title("Deploy to ready vs one plain process")

    ax = axes[1][1]
    if deploys:
        bottom_pos = [0.0] * len(deploys)
        bottom_neg = [0.0] * len(deploys)
        colors = plt.get_cmap("tab20")
        for n, cause in enumerate(CAUSES):
            values = [d["causes_s"].get(cause, 0.0) for d in deploys.values()]
            base = [bottom_pos[i] if v >= 0 else bottom_neg[i] for i, v in enumerate(values)]
            ax.bar(list(deploys), values, bottom=base, label=cause, color=colors(n))
            for i, v in enumerate(values):
                if v >= 0:
                    bottom_pos[i] += v
                else:
                    bottom_neg[i] += v
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel("seconds above the plain process")
        ax.legend(fontsize=7, ncol=2)
    ax.set_title("Deploy to ready: the difference, by cause")

    ax = axes[2][0]
    big = results.get("big", {})
    if "publish" in big:
        p = big["publish"]
        if "blake3_s" in p:
            names = ["cp", "cp + fsync", "sha256\nalone", "BLAKE3\nalone", "publish"]
            values = [p["cp_s"], p["cp_fsync_s"], p["sha256_s"], p["blake3_s"], p["publish_s"]]
        else:
            names = ["cp", "cp + fsync", "sha256\nalone", "publish"]
            values = [p["cp_s"], p["cp_fsync_s"], p["hash_s"], p["publish_s"]]
        ax.bar(names, values, color=["grey"] * (len(names) - 1) + ["tab:blue"])
        ax.axhline(1.3 * p["cp_s"], color="tab:red", linestyle="--", label="goal: 1.3x cp")
        ax.set_ylabel("seconds")
        ax.legend()
    ax.set_title(f"Publishing a {_size(big.get('bytes', 2 * GIB))} artifact")

    ax = axes[2][1]
    if "warmup_rates" in results:
        w = results["warmup_rates"]
        keys = ["/bench/trivial", "/init/readyz", "/"]
        ax.bar(["trivial view", "readyz (503)", "warming-up page (503)"], [w[k] for k in keys])
        ax.axhline(
            0.8 * w["/bench/trivial"], color="tab:red", linestyle="--", label="goal: 0.8x trivial"
        )
        ax.set_ylabel("requests/s")
        ax.legend()
    ax.set_title("Answers during the warm-up")

    ax = axes[3][0]
    m = results.get("memory")
    if m:
        ax.bar(
            ["mmap artifact", "pickle per worker"],
            [m["mmap"]["added_pss_mib"], m["pickle"]["added_pss_mib"]],
        )
        ax.axhline(m["one_copy_mib"], color="grey", linestyle="--", label="one copy")
        ax.set_ylabel("MiB PSS added, 4 workers")
        ax.legend()
    ax.set_title("Memory")

    ax = axes[3][1]
    f = results.get("flood")
    if f:
        ax.bar(["quiet", "wrk on the\nwarming-up page"], [f["quiet_s"], f["flooded_s"]])
        ax.axhline(1.05 * f["quiet_s"], color="tab:red", linestyle="--", label="goal: 1.05x")
        ax.set_ylabel("seconds, deploy to ready")
        ax.legend()
    ax.set_title("A crowd during the deploy")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    """out/latest.json, latest.md and latest.png; the markdown also goes to stdout."""
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(results))
    chart(results, out / "latest.png")
    print(markdown(results))
