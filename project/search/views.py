"""The demo site: search Python's docstrings with the LSA index the init built."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from initpipeline import artifact, requires_artifacts


def _load_vocabulary(path: Path) -> dict[str, int]:
    """The terms, as the query folding needs them: term -> column, built once per load
    (in the background), not in the first request of each worker."""
    with open(path, "rb") as fh:
        return {term: i for i, term in enumerate(json.load(fh))}


def _touch(matrix: Any) -> None:
    """Warm-up: read every page of a memory-mapped matrix once, so the first search does
    not wait for the disk (the pages are shared by every worker through the page cache)."""
    import numpy as np

    np.add.reduce(matrix, axis=None)


# Handles: no I/O at import. Under Gunicorn each worker loads them in the background as
# it starts and whenever a newer generation is active, and swaps them all at once; the
# arrays are memory-mapped, so every worker shares one copy of their pages.
DOCS = artifact("lsa_docs", warmup=_touch)
TERMS = artifact("lsa_terms", warmup=_touch)
IDF = artifact("idf")
VOCABULARY = artifact("vocabulary", loader=_load_vocabulary)
TITLES = artifact("titles")


@requires_artifacts("lsa_docs", "lsa_terms", "idf", "vocabulary", "titles")
def search(request: HttpRequest) -> HttpResponse:
    query = request.GET.get("q", "").strip()[:200]
    results: list[dict[str, Any]] = []
    elapsed_ms = None
    if query:
        # Imported here: numpy would otherwise add ~40 ms to every worker's first answer.
        from . import engine

        started = time.perf_counter()
        titles = TITLES.get()
        vec = engine.fold_query(query, VOCABULARY.get(), IDF.get(), TERMS.get())
        if vec is not None:
            for i, score in engine.rank(DOCS.get(), vec, 10):
                title, summary = titles[i]
                results.append({"title": title, "summary": summary, "score": score})
        elapsed_ms = (time.perf_counter() - started) * 1000
    context = {
        "query": query,
        "results": results,
        "elapsed_ms": elapsed_ms,
        "generation": DOCS.generation,
        "documents": DOCS.get().shape[0],
    }
    return render(request, "search/search.html", context)


def about(request: HttpRequest) -> HttpResponse:
    """A page that needs no artifact: it answers as soon as Gunicorn does."""
    return HttpResponse(
        "initpipeline demo: docstring search. The search page is at /.\n",
        content_type="text/plain",
    )
