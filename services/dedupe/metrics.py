"""Dedupe's own Prometheus metrics (multiprocess-safe: counters and histograms only)."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

VERDICTS = Counter("metis_dedupe_verdicts_total", "Duplicate checks by verdict and verdict mode",
                   ["verdict", "mode"])
INDEXED = Counter("metis_dedupe_tickets_indexed_total", "Tickets written to the index, and how many were embedded",
                  ["kind"])
SEARCH_SECONDS = Histogram("metis_dedupe_search_seconds", "Time to rank candidates (embedding included)",
                           ["endpoint"], buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1, 2.5))
