"""The in-memory index's dense search: exact below the threshold, PCA shortlist + exact rerank above it."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest

from services.dedupe import index as index_mod
from services.dedupe.index import TicketIndex
from services.dedupe.lexical import Bm25Params


def _row(key: str, vec: np.ndarray, day: int) -> dict[str, Any]:
    return {"key": key, "deleted": False, "embedder": "test", "embedding": vec.astype("<f4").tobytes(),
            "created": datetime(2024, 1, 1, tzinfo=timezone.utc).replace(day=1 + day % 28, month=1 + day // 28 % 12),
            "project": "P", "status": "Open", "client": None, "resolution": None, "resolution_text": None,
            "summary": key, "priority": None, "components": [], "labels": [], "lex_summary": key.lower(),
            "lex_description": ""}


def _vectors(n: int, seed: int) -> np.ndarray:
    """Unit vectors with structure, as sentence embeddings have (a few dozen strong directions + noise)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 40)) @ rng.normal(size=(40, 384)) + 0.3 * rng.normal(size=(n, 384))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_shortlist_finds_the_exact_top_k_and_follows_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "COARSE_MIN_ROWS", 1000)
    monkeypatch.setattr(index_mod, "RERANK", 300)
    vecs = _vectors(3000, 1)
    ix = TicketIndex(384, "test", Bm25Params())
    for i, v in enumerate(vecs):
        ix.apply(_row(f"T-{i}", v, i))
    assert ix.basis is None
    ix.build_coarse()
    assert ix.basis is not None and ix.basis.shape == (384, index_mod.COARSE_DIMS)
    queries = _vectors(20, 2)
    for j, q in enumerate(queries):
        mask = ix.mask(created_before=ix.created[: ix.size][j * 100]) if j % 2 else ix.mask()
        exact = np.where(mask, ix.dense(q), -np.inf)
        want = set(np.argsort(-exact)[:50][np.isfinite(np.sort(-exact)[:50])].tolist())
        got = ix.dense_top(q, mask, 50)
        assert set(got.tolist()) == want
        assert mask[got].all()
        assert np.allclose(ix.cosines(q, got), ix.dense(q)[got])
    # A row added or changed after the basis was built is projected too: a copy of a query is found first.
    ix.apply(_row("NEW-1", queries[0], 3))
    ix.apply(_row("T-5", queries[1], 3))
    assert ix.meta[ix.dense_top(queries[0], ix.mask(), 1)[0]].key == "NEW-1"  # type: ignore[union-attr]
    assert ix.meta[ix.dense_top(queries[1], ix.mask(), 1)[0]].key == "T-5"  # type: ignore[union-attr]
    # and a deleted ticket is never returned
    ix.apply({**_row("NEW-1", queries[0], 3), "deleted": True})
    assert "NEW-1" not in {ix.meta[s].key for s in ix.dense_top(queries[0], ix.mask(), 10)}  # type: ignore[union-attr]


def test_small_index_uses_the_exact_scan() -> None:
    vecs = _vectors(200, 3)
    ix = TicketIndex(384, "test", Bm25Params())
    for i, v in enumerate(vecs):
        ix.apply(_row(f"T-{i}", v, i))
    assert ix.basis is None
    top = ix.dense_top(vecs[7], ix.mask(), 5)
    assert 7 in top.tolist() and len(top) == 5
    assert len(ix.dense_top(vecs[7], np.zeros(ix.size, dtype=bool), 5)) == 0
