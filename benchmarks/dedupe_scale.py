"""Dedupe at 100,000 tickets: start-up, memory and end-to-end query latency over HTTP under gunicorn.

How the synthetic tickets are made: each is a recombination of real gitbugs-hadoop tickets (the summary
of one, description sentences of two others, a random component and version), so the lexical index has
realistic vocabulary and posting-list lengths. Their vectors are the real MiniLM vector of the ticket the
summary came from plus Gaussian noise, re-normalised: embedding 100k texts on this shared 2-core machine
would take ~15 minutes and query latency does not depend on the vectors' values, only on their number.
Rows are written straight into dedupe.tickets (COPY), exactly as the API stores them, together with the
2,503 real reports and their real vectors. Queries are the 66 real duplicate queries of gitbugs-hadoop plus
134 other real reports, sent over HTTP like production; then 512 new tickets are indexed through the API.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python benchmarks/dedupe_scale.py
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psycopg
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.processes import free_port, start_service, wait_http  # noqa: E402
from services.dedupe.config import load_config  # noqa: E402
from services.dedupe.evaluation import load_dataset  # noqa: E402
from services.dedupe.service import LEXICAL_CHARS  # noqa: E402
from services.dedupe.text import clean, for_embedding, tokens  # noqa: E402
from shared import db  # noqa: E402
from shared.embeddings import MiniLMEmbedder, content_hash  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().split(") ")[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tickets", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dedupe_scale.json"))
    args = ap.parse_args()
    admin = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = "metis_dedupe_scale_" + secrets.token_hex(4)
    base = admin.rsplit("/", 1)[0]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = f"{base}/{name}"
    try:
        run(url, args)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run(url: str, args: argparse.Namespace) -> None:
    db.migrate(url, "dedupe")
    cfg = load_config(ROOT / "config")
    data = load_dataset(DATA / "issues.csv", DATA / "duplicate_pairs.csv", prefix="REAL")
    real = data.tickets
    emb = MiniLMEmbedder(cfg.embedding)
    t0 = time.perf_counter()
    texts = [for_embedding(clean(t["summary"]), clean(t["description"]), cfg.embed_max_chars) for t in real]
    vecs = emb.embed(texts)
    print(f"embedded {len(real)} real tickets in {time.perf_counter() - t0:.1f}s", flush=True)
    rng = random.Random(7)
    nrng = np.random.default_rng(7)
    sentences = [[s for s in re.split(r"(?<=[.!?])\s+", clean(t["description"])) if s][:6] for t in real]
    components = ["hdfs", "yarn", "mapreduce", "common", "s3a", "abfs", "kms", "tools", "build", "docs"]
    t0 = time.perf_counter()
    rev = 0
    with psycopg.connect(url) as conn:
        with conn.cursor().copy(
                "COPY dedupe.tickets (key, project, summary, description, status, resolution, components, "
                "created, content_hash, row_hash, embedder, embedding, lex_summary, lex_description, rev) "
                "FROM STDIN") as copy:
            def row(key: str, project: str, summary: str, desc: str, status: str | None, resolution: str | None,
                    comps: list[str], created: str, v: np.ndarray) -> tuple[object, ...]:
                nonlocal rev
                rev += 1
                text = for_embedding(summary, desc, cfg.embed_max_chars)
                lex_d = tokens(for_embedding("", desc, LEXICAL_CHARS))[: cfg.description_tokens]
                return (key, project, summary, desc[: cfg.description_chars_stored], status, resolution, comps,
                        created, content_hash(emb.name, text), secrets.token_hex(8), emb.name,
                        v.astype("<f4").tobytes(), " ".join(tokens(summary)), " ".join(lex_d), rev)

            # The real reports with their real vectors, so the real queries have their true duplicates.
            for t, v in zip(real, vecs):
                copy.write_row(row(t["key"], "REAL", clean(t["summary"]), clean(t["description"]), t["status"],
                                   t["resolution"], [], t["created"], v))
            for i in range(args.tickets - len(real)):
                a = rng.randrange(len(real))
                b, c = rng.randrange(len(real)), rng.randrange(len(real))
                summary = f"{clean(real[a]['summary'])} in {rng.choice(components)} {rng.randint(2, 3)}.{rng.randint(0, 4)}"
                desc = " ".join(sentences[b][:3] + sentences[c][:3])
                v = vecs[a] + nrng.normal(0, 0.35 / np.sqrt(vecs.shape[1]), vecs.shape[1]).astype(np.float32)
                v /= np.linalg.norm(v)
                copy.write_row(row(f"SYN-{i + 1}", "SYN", summary, desc, rng.choice(["Open", "Resolved"]),
                                   rng.choice([None, "Fixed"]), [rng.choice(components)],
                                   f"20{rng.randint(15, 19)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T10:00:00Z", v))
        conn.execute("INSERT INTO dedupe.index_state (id, rev) VALUES (1, %s)", (rev,))
        conn.commit()
    print(f"wrote {args.tickets} synthetic tickets in {time.perf_counter() - t0:.1f}s", flush=True)
    token = "bench-" + secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="metis-dedupe-scale-") as tmp:
        env = {**os.environ, "DATABASE_URL": url, "METIS_TOKEN_OPS": token}
        t0 = time.perf_counter()
        proc = start_service("dedupe", env=env, port=free_port(), log_dir=Path(tmp), workers=args.workers,
                             timeout=300)
        try:
            wait_http(proc, "/readyz", timeout=600)
            startup = time.perf_counter() - t0
            s = requests.Session()
            s.headers["Authorization"] = f"Bearer {token}"
            s.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=8))
            # Indexing through the API with 100k already indexed: 512 new tickets (real texts, new keys).
            new = [{**{k: v for k, v in t.items() if not k.startswith("_")}, "key": f"NEW-{j}"}
                   for j, t in enumerate(real[::max(1, len(real) // 512)][:512])]
            def send(chunk: list[dict[str, object]]) -> None:
                r = s.post(proc.url + "/v1/tickets", json={"tickets": chunk}, timeout=300)
                r.raise_for_status()

            t1 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.workers) as ex:  # one batch in flight per worker
                list(ex.map(send, [new[i:i + 64] for i in range(0, len(new), 64)]))
            index_rate = len(new) / (time.perf_counter() - t1)
            stats = s.get(proc.url + "/v1/index", timeout=30).json()
            qkeys = [k for k, _ in data.queries] + data.negatives[:: max(1, len(data.negatives) // 134)][:134]
            qkeys = qkeys[: args.queries]
            for k in qkeys[:10]:  # warm-up: every worker builds its BM25 delta segment once
                s.post(proc.url + "/v1/duplicates", json={"ticket": {"summary": data.by_key[k]["summary"]}})
            lat = []
            for k in qkeys:
                t = data.by_key[k]
                body = {"ticket": {"summary": t["summary"], "description": t["description"], "created": t["created"]},
                        "limit": 10, "created_before": t["created"]}
                t2 = time.perf_counter()
                r = s.post(proc.url + "/v1/duplicates", json=body, timeout=60)
                lat.append((time.perf_counter() - t2) * 1000)
                r.raise_for_status()
            lat.sort()
            workers = children(proc.popen.pid)
            mem = {str(p): round(rss_mb(p), 1) for p in workers}
            result = {"tickets_indexed": stats["tickets"], "workers": args.workers,
                      "startup_to_ready_s": round(startup, 1),
                      "query_p50_ms": round(statistics.median(lat), 1), "query_p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 1),
                      "query_mean_ms": round(statistics.mean(lat), 1), "queries": len(lat),
                      "api_index_rate_tickets_per_s_with_100k_indexed": round(index_rate, 1),
                      "worker_rss_mb": mem, "master_rss_mb": round(rss_mb(proc.popen.pid), 1)}
        finally:
            proc.stop()
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
