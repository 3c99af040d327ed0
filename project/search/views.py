"""The demo site: search Python's docstrings with the LSA index the init built."""

from __future__ import annotations

import time
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from initpipeline import artifact, requires_artifacts
from initpipeline.loading import active

# Handles: no I/O at import. Each worker loads them on first use and shares the arrays'
# pages with every other worker (memory-mapped .npy files).
DOCS = artifact("lsa_docs")
TERMS = artifact("lsa_terms")
IDF = artifact("idf")
VOCABULARY = artifact("vocabulary")
TITLES = artifact("titles")

_vocab_index: tuple[int, dict[str, int]] = (0, {})


def _vocab() -> dict[str, int]:
    global _vocab_index
    terms = VOCABULARY.get()
    if _vocab_index[0] != id(terms):
        _vocab_index = (id(terms), {t: i for i, t in enumerate(terms)})
    return _vocab_index[1]


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
        vec = engine.fold_query(query, _vocab(), IDF.get(), TERMS.get())
        if vec is not None:
            for i, score in engine.rank(DOCS.get(), vec, 10):
                title, summary = titles[i]
                results.append({"title": title, "summary": summary, "score": score})
        elapsed_ms = (time.perf_counter() - started) * 1000
    context = {
        "query": query,
        "results": results,
        "elapsed_ms": elapsed_ms,
        "generation": active.snapshot().generation_id,
        "documents": DOCS.get().shape[0],
    }
    return render(request, "search/search.html", context)


def about(request: HttpRequest) -> HttpResponse:
    """A page that needs no artifact: it answers as soon as Gunicorn does."""
    return HttpResponse(
        "initpipeline demo: docstring search. The search page is at /.\n",
        content_type="text/plain",
    )
