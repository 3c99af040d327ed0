"""Text processing shared by the demo's phases and its search view."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

TOKEN = re.compile(r"[a-z][a-z0-9]{1,30}")
STOP = frozenset(
    [
        "the",
        "and",
        "for",
        "that",
        "this",
        "with",
        "from",
        "are",
        "not",
        "be",
        "is",
        "it",
        "of",
        "to",
        "in",
        "a",
        "an",
        "as",
        "by",
        "on",
        "or",
        "if",
        "its",
        "can",
        "will",
        "which",
        "when",
        "use",
        "used",
        "using",
        "return",
        "returns",
        "none",
        "true",
        "false",
        "should",
        "must",
        "may",
        "than",
        "then",
        "also",
        "into",
        "only",
        "other",
        "such",
        "there",
        "these",
        "their",
        "been",
        "has",
        "have",
        "was",
        "were",
        "all",
        "any",
        "each",
        "more",
        "most",
        "some",
        "but",
        "see",
        "self",
        "cls",
    ]
)


def tokens(text: str) -> list[str]:
    return [t for t in TOKEN.findall(text.lower()) if t not in STOP]


def idf_weights(doc_freq: Sequence[int], n_docs: int) -> np.ndarray:
    df = np.asarray(doc_freq, dtype=np.float64)
    return np.log((1 + n_docs) / (1 + df)) + 1.0


def tf_row(words: Iterable[str], vocab: dict[str, int]) -> tuple[list[int], list[float]]:
    counts = Counter(w for w in words if w in vocab)
    cols = [vocab[w] for w in counts]
    vals = [1.0 + math.log(c) for c in counts.values()]  # sublinear tf
    return cols, vals


def fold_query(
    query: str, vocab: dict[str, int], idf: np.ndarray, term_proj: np.ndarray
) -> np.ndarray | None:
    """Map a query into the LSA space; None when no query word is known."""
    cols, vals = tf_row(tokens(query), vocab)
    if not cols:
        return None
    weights = np.asarray(vals) * idf[cols]
    weights /= np.linalg.norm(weights)
    vec = weights @ term_proj[cols]
    norm = np.linalg.norm(vec)
    return None if norm == 0 else vec / norm


def rank(doc_vectors: np.ndarray, query_vec: np.ndarray, k: int = 10) -> list[tuple[int, float]]:
    """Top ``k`` documents by cosine similarity (document vectors are unit length)."""
    scores = doc_vectors @ query_vec.astype(doc_vectors.dtype)
    k = min(k, scores.shape[0])
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top])]
    return [(int(i), float(scores[i])) for i in top]
