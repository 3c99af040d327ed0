"""The demo's init: a latent-semantic search index over Python's own docstrings.

Real CPU work on data every machine has: parse every module of the standard library and
of the packages the demo installs (at larger scales, all of site-packages) with ast; build
a TF-IDF matrix; compute a truncated SVD (LSA); check a few known queries.
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings

from initpipeline import PhaseContext, phase

from . import engine


def _corpus_config() -> dict[str, Any]:
    scale = float(settings.SEARCH_SCALE)
    return {
        "scale": scale,
        "max_files": int(settings.SEARCH_MAX_DOCS),
        "shards": int(settings.SEARCH_SHARDS),
    }


def _lsa_config() -> dict[str, Any]:
    scale = float(settings.SEARCH_SCALE)
    return {"components": int(200 * scale)}


SKIP = {"test", "tests", "idle_test", "__pycache__", "site-packages", "lib2to3"}


def _demo_packages() -> set[Path]:
    """The modules of the packages requirements.txt installs, and of what they need: what a
    host running the demo has, whatever else (test tools, say) shares its environment."""
    requirements = Path(settings.BASE_DIR) / "requirements.txt"
    names = [
        re.split(r"[\[=<>~!; ]", line.strip())[0]
        for line in requirements.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-"))
    ]
    purelib = Path(sysconfig.get_paths()["purelib"])
    dists: dict[str, metadata.Distribution] = {}
    while names:
        name = names.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in dists:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        dists[key] = dist
        names.extend(
            re.split(r"[\[=<>~!; (]", r.strip())[0] for r in dist.requires or [] if "extra" not in r
        )
    found = set()
    for dist in dists.values():
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file)))
            inside = path.suffix == ".py" and path.is_relative_to(purelib)
            if inside and not SKIP & set(path.relative_to(purelib).parts):
                found.add(path)
    return found


def _source_files(scale: float, max_files: int) -> list[Path]:
    """Scale below 1: a part of the standard library; 1: the standard library and the
    packages the demo installs; 2 and more: all of site-packages too."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    if scale >= 2:
        roots.append(Path(paths["purelib"]))
    found: list[Path] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP and not d.startswith("."))
            found.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if 1 <= scale < 2:
        found.extend(sorted(_demo_packages()))
    if max_files and len(found) > max_files:
        # The modules of KNOWN_QUERIES are always in, whole, whatever else is installed:
        # an even sample of a large site-packages may otherwise keep json/tool.py and not
        # json/encoder.py, and the quality check would look for what the corpus lacks.
        anchors = {"json", "re", "tempfile", "socket", "gzip", "http"}
        stdlib = roots[0]
        kept = [
            p
            for p in found
            if (p.parent == stdlib and p.stem in anchors)
            or (p.parent.parent == stdlib and p.parent.name in anchors)
        ][:max_files]
        keep = set(kept)
        rest = [p for p in found if p not in keep]
        step = len(rest) / (max_files - len(kept)) if max_files > len(kept) else 0
        chosen = keep | {rest[int(i * step)] for i in range(max_files - len(kept))}
        found = [p for p in found if p in chosen]
    return found


_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]+?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``(.+?)``")
_REFERENCE = re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{0,2}")
_STRONG = re.compile(r"\*\*(.+?)\*\*")


def plain(text: str) -> str:
    """A docstring's reStructuredText as the text it reads as: ``x``, :func:`x`, `x`_ and
    **x** become x; lines are joined."""
    for pattern in (_ROLE, _LITERAL, _REFERENCE, _STRONG):
        text = pattern.sub(r"\1", text)
    return " ".join(text.split())


def _module_name(path: Path) -> str:
    paths = sysconfig.get_paths()
    for root in (paths["purelib"], paths["stdlib"]):
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)
    return path.stem


def _merge_corpus(ctx: PhaseContext) -> None:
    """Join the shards' corpus and titles in shard order (the files' order)."""
    docs = [doc for part in ctx.load_parts("corpus") for doc in part]
    files = len(_source_files(ctx.config["scale"], ctx.config["max_files"]))
    ctx.logger.info("collected %d docstrings from %d files", len(docs), files)
    ctx.save_json("corpus", docs, metadata={"documents": len(docs), "files": files})
    ctx.save_json("titles", [title for part in ctx.load_parts("titles") for title in part])


# code=: the functions and modules outside the phase function whose code shapes its
# artifacts count in its fingerprint too, so editing them re-runs it (README: Writing phases).
@phase(
    produces=["corpus", "titles"],
    version="3",
    config=_corpus_config,
    code=[_source_files, _demo_packages, _module_name, plain],
    timeout=3600,
    # Split over every worker process: each shard parses its share of the files, and
    # _merge_corpus joins the shards' lists in order.
    shards=lambda config: config["shards"],
    merge=_merge_corpus,
)
def collect_docstrings(ctx: PhaseContext) -> None:
    """Parse this shard's share of the modules and keep the docstrings of modules, classes
    and functions.

    Checkpoints every tenth of its files: a worker killed mid-phase costs at most that
    much, and one shutting down hands the phase over with everything parsed so far.
    """
    assert ctx.shard is not None
    every_file = _source_files(ctx.config["scale"], ctx.config["max_files"])
    files = [every_file[i] for i in ctx.shard.slice(len(every_file))]
    state = ctx.resumed or {"done": 0, "docs": []}
    docs: list[list[str]] = state["docs"]
    every = max(1, len(files) // 10)
    for i in range(int(state["done"]), len(files)):
        path = files[i]
        module = _module_name(path)
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            tree = None
        nodes: list[Any] = [] if tree is None else [tree]
        nodes.extend(
            n
            for n in (ast.walk(tree) if tree is not None else ())
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        )
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                title = module if node is tree else f"{module}.{node.name}"
                docs.append([title, doc[:4000]])
        done = i + 1
        if done % every == 0 and done < len(files):
            ctx.checkpoint({"done": done, "docs": docs}, done=done, total=len(files))
        ctx.progress(
            done,
            len(files),
            f"parsed {module}",
            checkpoint=lambda done=done: {"done": done, "docs": docs},
        )
    ctx.logger.info("collected %d docstrings from %d files", len(docs), len(files))
    ctx.save_json("corpus", docs, metadata={"documents": len(docs), "files": len(files)})
    # What the web page shows of each hit: small, so web workers never hold the corpus.
    ctx.save_json("titles", [[title, plain(text.split("\n\n")[0])[:240]] for title, text in docs])


@phase(
    produces=["vocabulary", "idf", "tfidf"], after="collect_docstrings", version="1", code=[engine]
)
def build_tfidf(ctx: PhaseContext) -> None:
    """Tokenize, build the vocabulary and a sublinear TF-IDF matrix (CSR, rows unit length)."""
    from scipy import sparse

    docs = ctx.load("corpus")
    tokenized = []
    doc_freq: Counter[str] = Counter()
    for i, (title, text) in enumerate(docs):
        words = engine.tokens(title.replace(".", " ") + " " + text)
        tokenized.append(words)
        doc_freq.update(set(words))
        if i % 500 == 0:
            ctx.progress(i, len(docs) * 2, "tokenizing")
    max_df = 0.5 * len(docs)
    terms = sorted(t for t, df in doc_freq.items() if 2 <= df <= max_df)
    vocab = {t: j for j, t in enumerate(terms)}
    idf = engine.idf_weights([doc_freq[t] for t in terms], len(docs))
    indptr, indices, values = [0], [], []
    for i, words in enumerate(tokenized):
        cols, vals = engine.tf_row(words, vocab)
        row = np.asarray(vals) * idf[cols] if cols else np.zeros(0)
        norm = np.linalg.norm(row)
        indices.extend(cols)
        values.extend((row / norm).tolist() if norm else [])
        indptr.append(len(indices))
        if i % 500 == 0:
            ctx.progress(len(docs) + i, len(docs) * 2, "weighting")
    matrix = sparse.csr_matrix(
        (np.asarray(values, dtype=np.float32), indices, indptr), shape=(len(docs), len(terms))
    )
    path = ctx.scratch_path(".npz")
    sparse.save_npz(path, matrix, compressed=False)
    ctx.save_json("vocabulary", terms, metadata={"terms": len(terms)})
    ctx.save_array("idf", idf.astype(np.float32))
    ctx.save_file("tfidf", path, metadata={"shape": list(matrix.shape), "nnz": int(matrix.nnz)})


@phase(produces=["lsa_docs", "lsa_terms"], after="build_tfidf", version="1", config=_lsa_config)
def compute_lsa(ctx: PhaseContext) -> None:
    """Truncated SVD of the TF-IDF matrix: unit document vectors and the term projection."""
    from scipy import sparse
    from scipy.sparse.linalg import svds

    matrix = sparse.load_npz(ctx.load("tfidf")).astype(np.float64)
    k = max(2, min(ctx.config["components"], min(matrix.shape) - 1))
    ctx.progress(0, 3, f"truncated SVD, {k} components of a {matrix.shape} matrix")
    # Several short solves would report progress more often, but the single Lanczos solve
    # is what a user would run; the heartbeat thread keeps the phase alive meanwhile.
    u, s, vt = svds(matrix, k=k, random_state=0)
    ctx.progress(2, 3, "normalizing")
    order = np.argsort(-s)
    u, s, vt = u[:, order], s[order], vt[order]
    docs = (u * s).astype(np.float32)
    docs /= np.maximum(np.linalg.norm(docs, axis=1, keepdims=True), 1e-12)
    term_proj = (vt.T / s).astype(np.float32)
    ctx.save_array("lsa_docs", docs)
    ctx.save_array("lsa_terms", term_proj)
    ctx.progress(3, 3, f"{k} components")


# Each query names what it looks for, as a user would: in a corpus that holds a large
# site-packages, "temporary file directory" alone ranks zipfile and shutil first.
KNOWN_QUERIES = [
    ("json encoder decoder", "json"),
    ("regular expression pattern match", "re"),
    ("tempfile temporary file directory", "tempfile"),
    ("socket connect address", "socket"),
    ("compress decompress gzip", "gzip"),
    ("http request response header", "http"),
]


@phase(
    produces="search_report",
    inputs=["corpus", "vocabulary", "idf", "lsa_docs", "lsa_terms"],
    version="1",
    code=[engine],
    # A module global is not code: the queries count as config.
    config={"queries": KNOWN_QUERIES},
)
def check_queries(ctx: PhaseContext) -> None:
    """Run known queries; fail the run when the index cannot find what it obviously should."""
    docs = ctx.load("corpus")
    titles = [t for t, _ in docs]
    vocab = {t: j for j, t in enumerate(ctx.load("vocabulary"))}
    idf, doc_vecs, term_proj = ctx.load("idf"), ctx.load("lsa_docs"), ctx.load("lsa_terms")
    results = []
    checkable = hits = 0
    for query, module in KNOWN_QUERIES:
        # A hit is a module of that name, wherever it lives: django.middleware.gzip answers
        # "compress decompress gzip" as well as the standard library's gzip does. Only
        # queries whose module the corpus holds count.
        present = any(module in t.split(".") for t in titles)
        vec = engine.fold_query(query, vocab, idf, term_proj)
        top = engine.rank(doc_vecs, vec, 10) if vec is not None else []
        found = [titles[i] for i, _ in top]
        ok = any(module in t.split(".") for t in found)
        checkable += present
        hits += ok and present
        results.append({"query": query, "expect": module, "top": found[:5], "ok": ok})
    if checkable and hits * 2 < checkable:
        raise AssertionError(f"only {hits} of {checkable} known queries found their module")
    ctx.save_json("search_report", {"hits": hits, "checkable": checkable, "queries": results})
