"""An in-process BM25F index: two fields (summary weighted over description), sparse-matrix scoring.

Doc-side BM25F weights are baked into a CSC matrix (docs x terms) so a query is one sparse slice and a
mat-vec, a few milliseconds at 100,000 tickets. Changes go to a small delta segment that is merged into
the base segment when it grows (an LSM in miniature), so an upsert never rebuilds 100k rows inline.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Bm25Params:
    """BM25F parameters; chosen on the development split (see config/dedupe.yaml)."""

    k1: float = 1.2
    b_summary: float = 0.5
    b_description: float = 0.75
    w_summary: float = 3.0
    w_description: float = 1.0
    # weight of query terms found only in the query's description (its summary terms weigh 1)
    q_description: float = 0.4


class _Segment:
    """An immutable block of documents: slot ids and their BM25F weight matrix (CSC, docs x vocab)."""

    def __init__(self, slots: np.ndarray, matrix: sp.csc_matrix) -> None:
        self.slots = slots
        self.matrix = matrix


class LexicalIndex:
    """BM25F over slots (integer row ids shared with the dense matrix)."""

    def __init__(self, params: Bm25Params | None = None, merge_at: int = 2000) -> None:
        self.params = params or Bm25Params()
        self.merge_at = merge_at
        self.vocab: dict[str, int] = {}
        self.terms: list[str] = []  # id -> term (for explaining matches)
        self.df = np.zeros(1024, dtype=np.int32)
        # slot -> int32 array (3, n): term ids, summary tf, description tf (one object per doc: memory at 100k)
        self.docs: dict[int, np.ndarray] = {}
        self._len_s = 0.0
        self._len_d = 0.0
        self._base: _Segment | None = None
        self._base_avg = (1.0, 1.0)
        self._delta: set[int] = set()
        self._delta_seg: _Segment | None = None
        self._stale: set[int] = set()  # slots whose base row is outdated
        self._dead: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.docs)

    def _term_ids(self, terms: list[str], grow: bool) -> list[int]:
        ids = []
        for t in terms:
            i = self.vocab.get(t)
            if i is None:
                if not grow:
                    continue
                i = len(self.vocab)
                self.vocab[t] = i
                self.terms.append(t)
            ids.append(i)
        if len(self.vocab) > len(self.df):
            self.df = np.concatenate([self.df, np.zeros(len(self.df), dtype=np.int32)])
        return ids

    def put(self, slot: int, summary_tokens: list[str], description_tokens: list[str]) -> None:
        """Add or replace the document in `slot`."""
        self.remove(slot)
        cs = Counter(self._term_ids(summary_tokens, True))
        cd = Counter(self._term_ids(description_tokens, True))
        terms = sorted(set(cs) | set(cd))
        doc = np.array([terms, [cs.get(t, 0) for t in terms], [cd.get(t, 0) for t in terms]], dtype=np.int32)
        doc = doc.reshape(3, len(terms))
        terms_arr, tfs, tfd = doc
        self.docs[slot] = doc
        self.df[terms_arr] += 1
        self._len_s += float(tfs.sum())
        self._len_d += float(tfd.sum())
        self._delta.add(slot)
        self._stale.add(slot)
        self._delta_seg = None
        self._dead = None

    def remove(self, slot: int) -> None:
        """Forget the document in `slot` (no-op if absent)."""
        old = self.docs.pop(slot, None)
        if old is None:
            return
        self.df[old[0]] -= 1
        self._len_s -= float(old[1].sum())
        self._len_d -= float(old[2].sum())
        self._delta.discard(slot)
        self._stale.add(slot)
        self._delta_seg = None
        self._dead = None

    def _build(self, slots: list[int], avg: tuple[float, float]) -> _Segment:
        p = self.params
        avg_s, avg_d = avg
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        for r, slot in enumerate(slots):
            terms, tfs, tfd = self.docs[slot]
            ls, ld = float(tfs.sum()), float(tfd.sum())
            tf = (p.w_summary * tfs / (1 - p.b_summary + p.b_summary * ls / avg_s)
                  + p.w_description * tfd / (1 - p.b_description + p.b_description * ld / avg_d))
            rows.append(np.full(len(terms), r, dtype=np.int32))
            cols.append(terms)
            vals.append(tf / (p.k1 + tf))
        n_terms = max(len(self.vocab), 1)
        if rows:
            m = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(len(slots), n_terms), dtype=np.float32)
        else:
            m = sp.csc_matrix((0, n_terms), dtype=np.float32)
        return _Segment(np.array(slots, dtype=np.int64), m)

    def _averages(self) -> tuple[float, float]:
        n = max(len(self.docs), 1)
        return max(self._len_s / n, 1.0), max(self._len_d / n, 1.0)

    def compact(self) -> None:
        """Rebuild the base segment from every document (also refreshes average lengths)."""
        self._base_avg = self._averages()
        self._base = self._build(sorted(self.docs), self._base_avg)
        self._delta.clear()
        self._stale.clear()
        self._delta_seg = None
        self._dead = None

    def _segments(self) -> list[tuple[_Segment, np.ndarray | None]]:
        if self._base is None or len(self._delta) > max(self.merge_at, len(self.docs) // 20):
            self.compact()
        assert self._base is not None
        if self._delta_seg is None:
            self._delta_seg = self._build(sorted(self._delta), self._base_avg)
        if self._dead is None and self._stale:
            self._dead = np.isin(self._base.slots, np.fromiter(self._stale, dtype=np.int64))
        return [(self._base, self._dead), (self._delta_seg, None)]

    def query_weights(self, summary_tokens: list[str], description_tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Query term ids and weights: idf x (summary tf + q_description x description tf), saturated."""
        p = self.params
        qs = Counter(self._term_ids(summary_tokens, False))
        qd = Counter(self._term_ids(description_tokens, False))
        terms = np.array(sorted(set(qs) | set(qd)), dtype=np.int64)
        if len(terms) == 0:
            return terms, np.zeros(0, dtype=np.float32)
        n = len(self.docs)
        df = self.df[terms].astype(np.float64)
        idf = np.log1p((n - df + 0.5) / (df + 0.5))
        qtf = np.array([qs.get(int(t), 0) + p.q_description * qd.get(int(t), 0) for t in terms])
        return terms, (idf * qtf / (0.5 + qtf) * 1.5).astype(np.float32)

    def score(self, summary_tokens: list[str], description_tokens: list[str], size: int) -> np.ndarray:
        """BM25F score of every slot (array of length `size`, zero where absent)."""
        out = np.zeros(size, dtype=np.float32)
        terms, w = self.query_weights(summary_tokens, description_tokens)
        if len(terms) == 0:
            return out
        for seg, dead in self._segments():
            if seg.matrix.shape[0] == 0:
                continue
            known = terms < seg.matrix.shape[1]  # terms newer than the segment cannot occur in it
            if not known.any():
                continue
            s = np.asarray(seg.matrix[:, terms[known]] @ w[known]).ravel()
            if dead is not None:
                s = np.where(dead, 0.0, s)
            out[seg.slots] = np.maximum(out[seg.slots], s)
        return out

    def self_score(self, summary_tokens: list[str], description_tokens: list[str]) -> float:
        """Score the query would get against itself: the scale used to normalise BM25 across queries."""
        terms, w = self.query_weights(summary_tokens, description_tokens)
        if len(terms) == 0:
            return 0.0
        p = self.params
        avg_s, avg_d = self._base_avg
        ids = self.vocab
        cs = Counter(ids[t] for t in summary_tokens if t in ids)
        cd = Counter(ids[t] for t in description_tokens if t in ids)
        ls, ld = float(len(summary_tokens)), float(len(description_tokens))
        tfs = np.array([cs.get(int(t), 0) for t in terms], dtype=np.float64)
        tfd = np.array([cd.get(int(t), 0) for t in terms], dtype=np.float64)
        tf = (p.w_summary * tfs / (1 - p.b_summary + p.b_summary * ls / avg_s)
              + p.w_description * tfd / (1 - p.b_description + p.b_description * ld / avg_d))
        return float(np.dot(tf / (p.k1 + tf), w))
