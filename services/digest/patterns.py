"""Cross-client patterns: clusters of similar tickets in a window that span several clients, with trend."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import PatternRules
from .tickets import Ticket

# Rows of the similarity matrix computed at once: 512 × 20,000 float32 = 41 MB, whatever n is.
BLOCK = 512


def pattern_text(t: Ticket, description_chars: int) -> str:
    """What a ticket is embedded as: its summary and the start of its description."""
    desc = " ".join(t.description.split())[:description_chars]
    return f"{t.summary}\n{desc}" if desc else t.summary


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


# Above this many similar pairs the neighbour lists are not kept (memory); centres recompute their row instead.
MAX_EDGES = 20_000_000


def neighbours(x: np.ndarray, threshold: float) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Per row: how many other rows are ≥ threshold similar, and (while that stays small) which.

    Each block is compared only with itself and the rows after it (similarity is symmetric), which halves
    the work; memory stays bounded by BLOCK × n whatever n is."""
    n = x.shape[0]
    deg = np.zeros(n, dtype=np.int64)
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    edges = 0
    keep = True
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        sims = x[start:stop] @ x[start:].T
        # Only pairs (i, j) with j > i: the block's own upper triangle, and everything to its right.
        sims[:, : stop - start][np.tril_indices(stop - start)] = -1.0
        rows, cols = np.nonzero(sims >= threshold)
        rows += start
        cols += start
        deg += np.bincount(rows, minlength=n) + np.bincount(cols, minlength=n)
        if keep:
            edges += rows.size
            if edges > MAX_EDGES:
                keep, src, dst = False, [], []
            else:
                src += [rows, cols]
                dst += [cols, rows]
    if not keep:
        return deg, None
    if not src:
        return deg, [np.zeros(0, dtype=np.int64) for _ in range(n)]
    s_all = np.concatenate(src)
    d_all = np.concatenate(dst)
    order = np.argsort(s_all, kind="stable")
    s_all, d_all = s_all[order], d_all[order]
    bounds = np.searchsorted(s_all, np.arange(n + 1))
    return deg, [d_all[bounds[i]:bounds[i + 1]] for i in range(n)]


def neighbour_counts(x: np.ndarray, threshold: float) -> np.ndarray:
    """For each row, how many other rows are at least `threshold` cosine-similar."""
    return neighbours(x, threshold)[0]


@dataclass(frozen=True)
class Cluster:
    center: int                    # index of the representative (densest member)
    members: tuple[int, ...]       # indices, center included
    similarity: tuple[float, ...]  # each member's similarity to the center


def star_clusters(x: np.ndarray, threshold: float, min_size: int) -> list[Cluster]:
    """Greedy density clustering: the unassigned ticket with the most similar neighbours becomes a centre and
    takes every unassigned ticket at least `threshold` similar to it. Deterministic; no chaining (every member
    is close to the representative)."""
    n = x.shape[0]
    if n == 0:
        return []
    deg, nbrs = neighbours(x, threshold)
    order = np.lexsort((np.arange(n), -deg))  # most neighbours first, index breaks ties
    assigned = np.zeros(n, dtype=bool)
    clusters: list[Cluster] = []
    for c in order:
        if deg[c] + 1 < min_size:
            break  # nobody after this can gather min_size members
        if assigned[c]:
            continue
        if nbrs is not None:
            cand = nbrs[c][~assigned[nbrs[c]]]
        else:
            cand = np.flatnonzero((x @ x[c] >= threshold) & ~assigned)
            cand = cand[cand != c]
        if cand.size + 1 < min_size:
            continue
        members = np.concatenate(([c], cand))
        sims = x[members] @ x[c]
        assigned[members] = True
        ranked = np.argsort(-sims, kind="stable")
        clusters.append(Cluster(int(c), tuple(int(members[i]) for i in ranked),
                                tuple(round(float(sims[i]), 4) for i in ranked)))
    return clusters


@dataclass(frozen=True)
class Pattern:
    representative: Ticket
    tickets: tuple[Ticket, ...]
    similarity: tuple[float, ...]
    clients: tuple[tuple[str, int], ...]      # client, tickets — most affected first
    previous_count: int
    previous_clients: tuple[str, ...]
    trend: str                                 # new | rising | stable | falling
    cohesion: float                            # mean similarity to the representative
    components: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.tickets)


def trend_of(current: int, previous: int) -> str:
    """new (nothing before), rising (≥ +25 % and at least two more), falling (≤ −25 %), else stable."""
    if previous == 0:
        return "new"
    if current >= previous * 1.25 and current - previous >= 2:
        return "rising"
    if current <= previous * 0.75:
        return "falling"
    return "stable"


def find_patterns(current: Sequence[Ticket], current_vecs: np.ndarray, previous: Sequence[Ticket],
                  previous_vecs: np.ndarray, rules: PatternRules) -> list[Pattern]:
    """Clusters of the current window spanning ≥ min_clients clients, compared with the previous window."""
    if len(current) != len(current_vecs) or len(previous) != len(previous_vecs):
        raise ValueError("tickets and vectors differ in length")
    if not current:
        return []
    x = _normalize(current_vecs)
    prev = _normalize(previous_vecs) if len(previous) else np.zeros((0, x.shape[1]), dtype=np.float32)
    patterns: list[Pattern] = []
    kept: list[tuple[Cluster, list[Ticket], Counter[str]]] = []
    for cl in star_clusters(x, rules.similarity, rules.min_tickets):
        members = [current[i] for i in cl.members]
        per_client = Counter(c for t in members for c in dict.fromkeys(t.clients))
        if len(per_client) >= rules.min_clients:
            kept.append((cl, members, per_client))
    # The previous window counts tickets as close to a pattern's representative as its members must be.
    centres = np.array([cl.center for cl, _, _ in kept], dtype=np.int64)
    prev_hits = (prev @ x[centres].T >= rules.similarity) if len(prev) and len(kept) else None
    for k, (cl, members, per_client) in enumerate(kept):
        prev_idx = np.flatnonzero(prev_hits[:, k]) if prev_hits is not None else np.array([], dtype=np.int64)
        prev_clients = sorted({c for i in prev_idx for c in previous[int(i)].clients})
        comps = Counter(c for t in members for c in t.components)
        patterns.append(Pattern(
            representative=current[cl.center],
            tickets=tuple(members),
            similarity=cl.similarity,
            clients=tuple(sorted(per_client.items(), key=lambda kv: (-kv[1], kv[0]))),
            previous_count=int(prev_idx.size),
            previous_clients=tuple(prev_clients),
            trend=trend_of(len(members), int(prev_idx.size)),
            cohesion=round(float(np.mean(cl.similarity)), 4),
            components=tuple(c for c, _ in comps.most_common(3)),
        ))
    # Most clients first, then most tickets: breadth across customers is what makes it a pattern.
    patterns.sort(key=lambda p: (-len(p.clients), -p.count, p.representative.key))
    return patterns
