"""Where a query's time goes at 100,000 tickets, in process (no HTTP, no PostgreSQL): model, dense scan, BM25F.

Wall time on a shared machine mostly measures the neighbours, so the CPU time of this process (all
threads, BLAS included; torch runs one thread as in a worker) is reported too: roughly what a query
costs on an idle core. The same for indexing: tickets embedded per CPU second.

The lexical index holds 100k synthetic tickets recombined from gitbugs-hadoop texts; the dense matrix holds
100k random unit vectors (a scan costs the same whatever the values). Medians over the 66 real duplicate
queries, and the 1-minute load average so a reader can tell how busy the shared machine was.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.dedupe.config import load_config  # noqa: E402
from services.dedupe.evaluation import load_dataset  # noqa: E402
from services.dedupe.lexical import LexicalIndex  # noqa: E402
from services.dedupe.service import LEXICAL_CHARS  # noqa: E402
from services.dedupe.text import clean, for_embedding, tokens  # noqa: E402
from shared.embeddings import MiniLMEmbedder  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop"


def main(n: int = 100_000) -> None:
    cfg = load_config(ROOT / "config")
    data = load_dataset(DATA / "issues.csv", DATA / "duplicate_pairs.csv")
    real = data.tickets
    summ = [tokens(clean(t["summary"])) for t in real]
    desc = [tokens(for_embedding("", clean(t["description"]), LEXICAL_CHARS))[: cfg.description_tokens] for t in real]
    rng = random.Random(7)
    lex = LexicalIndex(cfg.lexical)
    t0 = time.perf_counter()
    for i in range(n):
        a, b, c = rng.randrange(len(real)), rng.randrange(len(real)), rng.randrange(len(real))
        lex.put(i, summ[a], desc[b][:60] + desc[c][:60])
    lex.compact()
    build = time.perf_counter() - t0
    vecs = np.random.default_rng(0).normal(size=(n, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    emb = MiniLMEmbedder(cfg.embedding)
    parts: dict[str, list[float]] = {"embed_query": [], "dense_scan": [], "bm25f": [], "top_k": [], "prep_text": []}
    cpu: list[float] = []
    for key, _ in data.queries:
        t = data.by_key[key]
        c0 = time.process_time()
        t0 = time.perf_counter()
        text = for_embedding(clean(t["summary"]), clean(t["description"]), cfg.embed_max_chars)
        qs, qd = tokens(clean(t["summary"])), tokens(for_embedding("", clean(t["description"]), LEXICAL_CHARS))[:400]
        t1 = time.perf_counter()
        q = emb.embed([text])[0]
        t2 = time.perf_counter()
        cos = vecs @ q
        t3 = time.perf_counter()
        bm = lex.score(qs, qd, n)
        t4 = time.perf_counter()
        np.argpartition(-cos, 199)[:200]
        np.argpartition(-bm, 199)[:200]
        t5 = time.perf_counter()
        cpu.append((time.process_time() - c0) * 1000)
        for name, dt in (("prep_text", t1 - t0), ("embed_query", t2 - t1), ("dense_scan", t3 - t2),
                         ("bm25f", t4 - t3), ("top_k", t5 - t4)):
            parts[name].append(dt * 1000)
    texts = [for_embedding(clean(t["summary"]), clean(t["description"]), cfg.embed_max_chars)
             for t in real[:: max(1, len(real) // 512)][:512]]
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, len(texts), 64):
        emb.embed(texts[i:i + 64])
    index_cpu, index_wall = time.process_time() - c0, time.perf_counter() - t0
    out = {"tickets": n, "lexical_build_s": round(build, 1), "load_average_1m": os.getloadavg()[0],
           "median_ms": {k: round(statistics.median(v), 2) for k, v in parts.items()},
           "median_query_cpu_ms": round(statistics.median(cpu), 2),
           "p95_query_cpu_ms": round(sorted(cpu)[int(0.95 * (len(cpu) - 1))], 2),
           "embedding_tickets_per_cpu_second": round(len(texts) / index_cpu, 1),
           "embedding_tickets_per_wall_second": round(len(texts) / index_wall, 1),
           "torch_threads": cfg.embedding.threads}
    out["median_total_ms"] = round(sum(out["median_ms"].values()), 2)  # type: ignore[arg-type]
    print(json.dumps(out, indent=2))
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "dedupe_query_profile.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
