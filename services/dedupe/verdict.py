"""The offline verdict: features of a candidate known at query time, and a small logistic model over them.

The model's weights and the two thresholds live in config/dedupe.yaml (section `verdict`); they are fitted
on the development split by `metis dedupe evaluate --calibrate` (see `fit_logistic` and
evaluation.calibrate). Everything here is pure: no I/O, no Flask, no index access.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .text import tokens

# Every feature a candidate gets; the response shows them for the best candidate, the model uses a subset.
FEATURES = (
    "cosine",            # MiniLM cosine of the query and the candidate
    "lexical_self",      # BM25F / BM25F of the query against itself, capped at 1 (absolute lexical match)
    "margin",            # fused score minus the best fused score of any other candidate (> 0 for the leader)
    "summary_overlap",   # Jaccard overlap of the two summaries' lexical tokens
    "log_days",          # ln(1 + days between the candidate and the query)
    "dense_gap",         # best cosine among the eligible candidates minus this one's (0: dense retrieval agrees)
    "lexical_gap",       # 1 - BM25F / best BM25F among the eligible candidates (0: lexical retrieval agrees)
    "version_conflict",  # both summaries name version numbers and share none ("Upgrade Jetty to 9.4.44" / "9.4.39")
)

_VERSION = re.compile(r"(?<![\w.])v?(\d+(?:\.\d+)+)")


def summary_versions(summary: str) -> frozenset[str]:
    """Version numbers named in a summary (2.9.10, 3.4.0-SNAPSHOT's 3.4.0, v1.2)."""
    return frozenset(m.group(1) for m in _VERSION.finditer(summary))


@dataclass(frozen=True)
class Evidence:
    """What the search knows about one candidate, as plain numbers (built by service.search)."""

    score: float
    cosine: float
    lexical_self: float
    cosine_best: float
    lexical_norm: float
    days: float | None
    summary: str


def features(candidates: Sequence[Evidence], i: int, query_summary: str) -> dict[str, float]:
    """The features of candidate i among the returned candidates (the query's own summary for overlaps)."""
    c = candidates[i]
    others = [o.score for j, o in enumerate(candidates) if j != i]
    q_tok, c_tok = set(tokens(query_summary)), set(tokens(c.summary))
    union = q_tok | c_tok
    qv, cv = summary_versions(query_summary), summary_versions(c.summary)
    return {
        "cosine": c.cosine,
        "lexical_self": min(1.0, c.lexical_self),
        "margin": c.score - max(others) if others else c.score,
        "summary_overlap": len(q_tok & c_tok) / len(union) if union else 0.0,
        "log_days": math.log1p(c.days) if c.days is not None else 0.0,
        "dense_gap": max(0.0, c.cosine_best - c.cosine),
        "lexical_gap": max(0.0, 1.0 - c.lexical_norm),
        "version_conflict": 1.0 if qv and cv and not (qv & cv) else 0.0,
    }


@dataclass(frozen=True)
class VerdictModel:
    """p(duplicate) = logistic(intercept + sum of weight x feature); features not weighted are ignored."""

    intercept: float = 0.0
    weights: Mapping[str, float] = field(default_factory=dict)

    def probability(self, x: Mapping[str, float]) -> float:
        z = self.intercept + sum(w * float(x[name]) for name, w in self.weights.items())
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def as_config(self) -> dict[str, Any]:
        return {"intercept": round(self.intercept, 4), "weights": {k: round(v, 4) for k, v in self.weights.items()}}


def decide(p: float, duplicate: float, possible: float) -> str:
    """The verdict for probability p; a duplicate threshold of 1 means the offline model never says "duplicate"."""
    if duplicate < 1.0 and p >= duplicate:
        return "duplicate"
    return "possible" if p >= possible else "none"


def fit_logistic(rows: Sequence[Mapping[str, float]], labels: Sequence[int], names: Sequence[str], *,
                 l2: float = 1.0) -> VerdictModel:
    """Maximum a-posteriori logistic regression (L2 penalty on standardised weights, none on the intercept).

    Few rows and rare positives: the penalty keeps the weights finite when a feature separates the
    classes. Returns the weights on the raw (unstandardised) features, ready for config/dedupe.yaml.
    """
    from scipy.optimize import minimize

    if not rows or len(rows) != len(labels):
        raise ValueError("need as many labels as rows, and at least one row")
    if not 0 < sum(labels) < len(labels):
        raise ValueError("need both positive and negative examples to fit a verdict model")
    x = np.array([[float(r[n]) for n in names] for r in rows], dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd[sd == 0] = 1.0
    z = (x - mu) / sd

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = theta[0] + z @ theta[1:]
        p = 1.0 / (1.0 + np.exp(-t))
        nll = float(np.sum(np.logaddexp(0.0, t) - y * t)) + 0.5 * l2 * float(theta[1:] @ theta[1:])
        g = p - y
        grad = np.concatenate([[g.sum()], z.T @ g + l2 * theta[1:]])
        return nll, grad

    theta = minimize(loss, np.zeros(len(names) + 1), jac=True, method="L-BFGS-B").x
    w = theta[1:] / sd
    return VerdictModel(float(theta[0] - np.sum(w * mu)), {n: float(v) for n, v in zip(names, w)})


def out_of_fold(rows: Sequence[Mapping[str, float]], labels: Sequence[int], folds: Sequence[int],
                names: Sequence[str], *, l2: float = 1.0) -> list[float]:
    """Each row's probability from a model fitted without its fold (folds are blocks of time)."""
    out = [float("nan")] * len(rows)
    for f in sorted(set(folds)):
        train = [i for i, g in enumerate(folds) if g != f]
        if not 0 < sum(labels[i] for i in train) < len(train):
            continue  # nothing to learn from without this fold: its rows stay NaN (ungraded)
        model = fit_logistic([rows[i] for i in train], [labels[i] for i in train], names, l2=l2)
        for i, g in enumerate(folds):
            if g == f:
                out[i] = model.probability(rows[i])
    return out
