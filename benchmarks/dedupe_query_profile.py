"""Where a query's time goes at 100,000 tickets, in process (no HTTP, no PostgreSQL): text preparation, the
query embedding, the filter mask, the dense scan, BM25F, top-k, as `services.dedupe.service.search` does them.

Wall time on a shared machine mostly measures the neighbours, so the CPU time of this process is reported
too (all threads, BLAS included; the model and BLAS run one thread each, as in a worker): roughly what a
query costs on an idle core. Also tickets embedded per CPU-second for indexing.

The lexical index holds 100k synthetic tickets recombined from gitbugs-hadoop texts; the dense matrix holds
100k random unit vectors (a scan costs the same whatever the values). The dense step is timed both ways:
the exact 384-dim scan (what ran before) and the PCA shortlist + exact rerank that runs above 20k tickets.
Medians over the 66 real duplicate queries, and the 1-minute load average so a reader can tell how busy the
shared machine was.

    .venv/bin/python benchmarks/dedupe_query_profile.py
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.dedupe.config import load_config  # noqa: E402
from services.dedupe.evaluation import load_dataset  # noqa: E402
from services.dedupe.index import TicketIndex  # noqa: E402
from services.dedupe.service import LEXICAL_CHARS  # noqa: E402
from services.dedupe.text import clean, for_embedding, tokens  # noqa: E402
from shared.embeddings import make_embedder  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop"


def main(n: int = 100_000) -> None:
    cfg = load_config(ROOT / "config")
    threadpool_limits(limits=max(1, cfg.embedding.threads), user_api="blas")
    data = load_dataset(DATA / "issues.csv", DATA / "duplicate_pairs.csv")
    real = data.tickets
    summ = [" ".join(tokens(clean(t["summary"]))) for t in real]
    desc = [tokens(for_embedding("", clean(t["description"]), LEXICAL_CHARS))[: cfg.description_tokens] for t in real]
    rng = random.Random(7)
    vecs = np.random.default_rng(0).normal(size=(n, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    emb = make_embedder(cfg.embedding)
    index = TicketIndex(emb.dim, emb.name, cfg.lexical, cfg.description_tokens)
    t0 = time.perf_counter()
    for i in range(n):
        a, b, c = rng.randrange(len(real)), rng.randrange(len(real)), rng.randrange(len(real))
        index.apply({"key": f"SYN-{i}", "deleted": False, "embedder": emb.name, "embedding": vecs[i].tobytes(),
                     "created": real[a]["_t"], "project": "SYN", "status": "Open", "client": None,
                     "resolution": None, "resolution_text": None, "summary": real[a]["summary"], "priority": None,
                     "components": [], "labels": [], "lex_summary": summ[a],
                     "lex_description": " ".join(desc[b][:60] + desc[c][:60])})
    index.lexical.compact()
    index.build_coarse()
    build = time.perf_counter() - t0
    parts: dict[str, list[float]] = {k: [] for k in ("prep_text", "embed_query", "mask", "dense_shortlist_rerank",
                                                      "bm25f", "top_k")}
    exact_scan: list[float] = []
    cpu: list[float] = []
    for key, _ in data.queries:
        t = data.by_key[key]
        c0 = time.process_time()
        t0 = time.perf_counter()
        text = for_embedding(clean(t["summary"]), clean(t["description"]), cfg.embed_max_chars)
        qs = tokens(clean(t["summary"]))
        qd = tokens(for_embedding("", clean(t["description"]), LEXICAL_CHARS))[: cfg.description_tokens]
        t1 = time.perf_counter()
        q = emb.embed([text])[0]
        t2 = time.perf_counter()
        m = index.mask(created_before=t["_t"].timestamp())
        t3 = time.perf_counter()
        top = index.dense_top(q, m, 200)
        index.cosines(q, top)
        t4 = time.perf_counter()
        bm = index.lexical.score(qs, qd, index.size)
        t5 = time.perf_counter()
        np.argpartition(-np.where(m, bm, -np.inf), 199)[:200]
        t6 = time.perf_counter()
        cpu.append((time.process_time() - c0) * 1000)
        for name, dt in (("prep_text", t1 - t0), ("embed_query", t2 - t1), ("mask", t3 - t2),
                         ("dense_shortlist_rerank", t4 - t3), ("bm25f", t5 - t4), ("top_k", t6 - t5)):
            parts[name].append(dt * 1000)
        t7 = time.perf_counter()
        np.argpartition(-np.where(m, index.dense(q), -np.inf), 199)[:200]
        exact_scan.append((time.perf_counter() - t7) * 1000)
    texts = [for_embedding(clean(t["summary"]), clean(t["description"]), cfg.embed_max_chars)
             for t in real[:: max(1, len(real) // 512)][:512]]
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, len(texts), 64):
        emb.embed(texts[i:i + 64])
    index_cpu, index_wall = time.process_time() - c0, time.perf_counter() - t0
    out = {"tickets": n, "embedder": emb.name, "index_build_s": round(build, 1),
           "load_average_1m": os.getloadavg()[0],
           "median_ms": {k: round(statistics.median(v), 2) for k, v in parts.items()},
           "median_query_cpu_ms": round(statistics.median(cpu), 2),
           "p95_query_cpu_ms": round(sorted(cpu)[int(0.95 * (len(cpu) - 1))], 2),
           "embedding_tickets_per_cpu_second": round(len(texts) / index_cpu, 1),
           "embedding_tickets_per_wall_second": round(len(texts) / index_wall, 1),
           "threads": cfg.embedding.threads,
           "for_comparison_exact_384_dim_scan_and_top_k_median_ms": round(statistics.median(exact_scan), 2)}
    out["median_total_ms"] = round(sum(out["median_ms"].values()), 2)  # type: ignore[arg-type]
    print(json.dumps(out, indent=2))
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "dedupe_query_profile.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
