"""The in-memory ticket index every worker keeps: a vector matrix, BM25F, and metadata arrays for filters.

Loaded from PostgreSQL at start-up and kept in sync by comparing a change counter on each request,
so several gunicorn workers (and replicas) agree with the database without talking to each other.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable

import numpy as np
from psycopg_pool import ConnectionPool

from . import repository
from .lexical import Bm25Params, LexicalIndex

log = logging.getLogger(__name__)

NO_TIME = -math.inf

# Dense search above COARSE_MIN_ROWS tickets: a scan of the vectors projected on their first COARSE_DIMS
# principal components (a quarter of the memory traffic of the full 384-dim scan) shortlists RERANK eligible
# tickets, and exact cosines over the full vectors pick the best among them. Measured at 100k tickets on
# the 66 real gitbugs-hadoop queries (benchmarks/dedupe_eval.md): the shortlist held every one of the exact
# top 200 (recall 1.000), at a third of the scan time. Below the threshold the exact scan is cheap anyway.
COARSE_MIN_ROWS = 20_000
COARSE_DIMS = 96
RERANK = 1000


@dataclass(slots=True)
class TicketMeta:
    """What a candidate shows without another database round trip."""

    key: str
    project: str | None
    summary: str
    status: str | None
    resolution: str | None
    resolution_text: str | None
    priority: str | None
    components: list[str]
    labels: list[str]
    client: str | None
    created: datetime | None


class _Codes:
    """Small string -> int code tables so filters are numpy comparisons."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def code(self, value: str | None) -> int:
        if value is None:
            return -1
        v = value.lower()
        if v not in self.ids:
            self.ids[v] = len(self.ids)
        return self.ids[v]

    def lookup(self, values: Iterable[str]) -> list[int]:
        return [self.ids[v.lower()] for v in values if v.lower() in self.ids]


class TicketIndex:
    """Vectors, BM25F and metadata by slot; a slot is reused by nothing (deleted slots just go dark)."""

    def __init__(self, dim: int, embedder_name: str, params: Bm25Params, description_tokens: int = 400) -> None:
        self.dim = dim
        self.embedder_name = embedder_name
        self.description_tokens = description_tokens
        self.lock = threading.RLock()
        self.lexical = LexicalIndex(params)
        self.slots: dict[str, int] = {}
        self.meta: list[TicketMeta | None] = []
        self.size = 0
        cap = 1024
        self.vectors = np.zeros((cap, dim), dtype=np.float32)
        self.alive = np.zeros(cap, dtype=bool)
        self.created = np.full(cap, NO_TIME, dtype=np.float64)
        self.project = np.full(cap, -1, dtype=np.int32)
        self.status = np.full(cap, -1, dtype=np.int32)
        self.client = np.full(cap, -1, dtype=np.int32)
        self.resolution = np.full(cap, -1, dtype=np.int32)
        self.codes = {"project": _Codes(), "status": _Codes(), "client": _Codes(), "resolution": _Codes()}
        self.basis: np.ndarray | None = None  # (dim, COARSE_DIMS) principal directions, once the index is large
        self.coarse = np.zeros((0, COARSE_DIMS), dtype=np.float32)
        self.rev = 0
        self.epoch: str | None = None
        self.last_check = 0.0
        self.stale_embedder = 0  # rows embedded by another model: kept out until re-indexed

    def __len__(self) -> int:
        return int(self.alive[: self.size].sum())

    def _grow(self) -> None:
        cap = len(self.alive) * 2
        self.vectors = np.concatenate([self.vectors, np.zeros_like(self.vectors)])
        if self.basis is not None:
            self.coarse = np.concatenate([self.coarse, np.zeros((cap - len(self.coarse), COARSE_DIMS), np.float32)])
        for name, fill in (("alive", False), ("created", NO_TIME), ("project", -1), ("status", -1),
                           ("client", -1), ("resolution", -1)):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.full(cap - len(arr), fill, dtype=arr.dtype)]))

    def apply(self, row: dict[str, Any]) -> None:
        """Apply one database row (upsert or tombstone)."""
        key = row["key"]
        slot = self.slots.get(key)
        if row["deleted"] or row["embedder"] != self.embedder_name:
            if row["embedder"] != self.embedder_name and not row["deleted"]:
                self.stale_embedder += 1
            if slot is not None:
                self.alive[slot] = False
                self.lexical.remove(slot)
                self.meta[slot] = None
            return
        if slot is None:
            if self.size == len(self.alive):
                self._grow()
            slot = self.size
            self.size += 1
            self.slots[key] = slot
            self.meta.append(None)
        self.vectors[slot] = np.frombuffer(row["embedding"], dtype="<f4")
        if self.basis is not None:
            self.coarse[slot] = self.vectors[slot] @ self.basis
        created: datetime | None = row["created"]
        self.created[slot] = created.timestamp() if created else NO_TIME
        self.project[slot] = self.codes["project"].code(row["project"])
        self.status[slot] = self.codes["status"].code(row["status"])
        self.client[slot] = self.codes["client"].code(row["client"])
        self.resolution[slot] = self.codes["resolution"].code(row["resolution"])
        self.meta[slot] = TicketMeta(key, row["project"], row["summary"], row["status"], row["resolution"],
                                     row["resolution_text"], row["priority"], list(row["components"] or []),
                                     list(row["labels"] or []), row["client"], created)
        self.lexical.put(slot, row["lex_summary"].split(),
                         row["lex_description"].split()[: self.description_tokens])
        self.alive[slot] = True

    def reset(self) -> None:
        """Forget everything (the database was emptied or restored)."""
        self.__init__(self.dim, self.embedder_name, self.lexical.params, self.description_tokens)  # type: ignore[misc]

    def refresh(self, pool: ConnectionPool, *, min_interval: float = 0.0) -> int:
        """Catch up with PostgreSQL; return how many rows were applied. Cheap when nothing changed."""
        now = time.monotonic()
        if min_interval and now - self.last_check < min_interval:
            return 0
        with pool.connection() as conn:
            state = repository.index_state(conn)
            conn.rollback()
            with self.lock:
                self.last_check = now
                if state is None:
                    if self.size or self.epoch is not None:
                        self.reset()
                    return 0
                if state["epoch"] != self.epoch:
                    if self.epoch is not None or self.size:
                        log.info("index epoch changed; reloading everything")
                    self.reset()
                    self.epoch = state["epoch"]
                target = int(state["rev"])
                if target <= self.rev:
                    return 0
                applied = 0
                with conn.transaction():
                    for page in repository.changes_since(conn, self.rev, up_to=target):
                        for row in page:
                            self.apply(row)
                        applied += len(page)
                self.rev = target
                if self.basis is None and len(self) >= COARSE_MIN_ROWS:
                    self.build_coarse()
                return applied

    def build_coarse(self, sample: int = 20_000) -> None:
        """Principal directions of (a sample of) the live vectors, and every row projected on them."""
        n = self.size
        live = np.flatnonzero(self.alive[:n])
        if len(live) > sample:
            live = np.sort(np.random.default_rng(0).choice(live, sample, replace=False))
        _, _, vt = np.linalg.svd(self.vectors[live], full_matrices=False)
        self.basis = np.ascontiguousarray(vt[:COARSE_DIMS].T, dtype=np.float32)
        self.coarse = np.zeros((len(self.alive), COARSE_DIMS), dtype=np.float32)
        self.coarse[:n] = self.vectors[:n] @ self.basis

    def mask(self, *, created_before: float | None = None, created_after: float | None = None,
             projects: list[str] | None = None, statuses: list[str] | None = None, clients: list[str] | None = None,
             exclude_resolutions: Iterable[str] | None = None, resolved_only: bool = False,
             exclude_keys: Iterable[str] = ()) -> np.ndarray:
        """Which slots a query may return."""
        n = self.size
        m = self.alive[:n].copy()
        if created_before is not None:
            m &= self.created[:n] < created_before
        if created_after is not None:
            m &= self.created[:n] >= created_after
        for arr, values, codes in ((self.project, projects, "project"), (self.status, statuses, "status"),
                                   (self.client, clients, "client")):
            if values is not None:
                m &= np.isin(arr[:n], self.codes[codes].lookup(values))
        if resolved_only:
            m &= self.resolution[:n] >= 0
        if exclude_resolutions:
            bad = self.codes["resolution"].lookup(exclude_resolutions)
            if bad:
                m &= ~np.isin(self.resolution[:n], bad)
        for key in exclude_keys:
            slot = self.slots.get(key)
            if slot is not None:
                m[slot] = False
        return m

    def dense(self, query: np.ndarray) -> np.ndarray:
        """Cosine of every slot with a unit query vector."""
        return self.vectors[: self.size] @ query

    def cosines(self, query: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Exact cosines of some slots with a unit query vector."""
        return self.vectors[slots] @ query

    def dense_top(self, query: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        """Slots of (up to) the k eligible tickets nearest to the query, best first not guaranteed."""
        n = self.size
        if self.basis is None:
            return top_k(np.where(mask, self.dense(query), -np.inf), k)
        shortlist = top_k(np.where(mask, self.coarse[:n] @ (query @ self.basis), -np.inf), max(k, RERANK))
        exact = self.cosines(query, shortlist)
        return shortlist[top_k(exact, k)]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest finite scores (unordered)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(-scores, k - 1)[:k]
    return idx[np.isfinite(scores[idx])]


LoadHook = Callable[[TicketIndex], None]
