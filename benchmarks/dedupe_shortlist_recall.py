"""Does the dense shortlist (PCA projection + exact rerank, services/dedupe/index.py) find the exact top 200?

100,000 vectors as in dedupe_scale.py: the 2,503 real gitbugs-hadoop reports embedded by the shipped model,
plus 97,497 synthetic neighbours (a real vector + Gaussian noise, re-normalised). For each of the 66 real
duplicate queries, with only earlier reports eligible (its `created_before` mask), compare the 200 best by
exact cosine with what `TicketIndex.dense_top` returns, for several projection sizes and shortlist lengths.

    .venv/bin/python benchmarks/dedupe_shortlist_recall.py
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.dedupe import index as index_mod  # noqa: E402
from services.dedupe.config import load_config  # noqa: E402
from services.dedupe.evaluation import load_dataset  # noqa: E402
from services.dedupe.index import TicketIndex  # noqa: E402
from services.dedupe.text import clean, for_embedding  # noqa: E402
from shared.embeddings import make_embedder  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop"


def main(n: int = 100_000, k: int = 200) -> None:
    threadpool_limits(limits=1, user_api="blas")
    cfg = load_config(ROOT / "config")
    emb = make_embedder(cfg.embedding)
    data = load_dataset(DATA / "issues.csv", DATA / "duplicate_pairs.csv")
    real = data.tickets
    vecs = emb.embed([for_embedding(clean(t["summary"]), clean(t["description"]), cfg.embed_max_chars) for t in real])
    rng = np.random.default_rng(7)
    src = rng.integers(0, len(real), n - len(real))
    noisy = vecs[src] + rng.normal(0, 0.35 / np.sqrt(vecs.shape[1]), (len(src), vecs.shape[1])).astype(np.float32)
    allv = np.concatenate([vecs, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)]).astype(np.float32)
    created = np.concatenate([[t["_t"].timestamp() for t in real], [real[i]["_t"].timestamp() for i in src]])
    pos = {t["key"]: i for i, t in enumerate(real)}
    results = []
    for dims in (64, 96, 128):
        for rerank in (600, 1000):
            index_mod.COARSE_DIMS, index_mod.RERANK = dims, rerank
            ix = TicketIndex(vecs.shape[1], emb.name, cfg.lexical)
            ix.vectors, ix.size = allv, n
            ix.alive = np.ones(n, dtype=bool)
            ix.build_coarse()
            recall, exact_ms, short_ms = [], [], []
            for key, _ in data.queries:
                q = vecs[pos[key]]
                m = created < data.by_key[key]["_t"].timestamp()
                t0 = time.perf_counter()
                s = np.where(m, ix.dense(q), -np.inf)
                want = np.argpartition(-s, k - 1)[:k]
                t1 = time.perf_counter()
                got = ix.dense_top(q, m, k)
                t2 = time.perf_counter()
                want = want[np.isfinite(s[want])]
                recall.append(len(set(want.tolist()) & set(got.tolist())) / max(1, len(want)))
                exact_ms.append((t1 - t0) * 1000)
                short_ms.append((t2 - t1) * 1000)
            results.append({"dims": dims, "shortlist": rerank, "recall_at_200_mean": round(float(np.mean(recall)), 4),
                            "recall_at_200_min": round(float(np.min(recall)), 4),
                            "exact_scan_ms_median": round(statistics.median(exact_ms), 2),
                            "shortlist_rerank_ms_median": round(statistics.median(short_ms), 2)})
            print(json.dumps(results[-1]), flush=True)
    out = {"tickets": n, "queries": len(data.queries), "k": k, "embedder": emb.name,
           "load_average_1m": os.getloadavg()[0], "results": results}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "dedupe_shortlist_recall.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
