"""Embedding throughput side by side on this CPU: plain MiniLM (fp32, 256 tokens, raw text) vs what dedupe runs.

All variants run in one process on the same 512 gitbugs-hadoop tickets, interleaved round by round, so
a noisy shared machine slows them alike; medians are reported. Also times the tokenising / hashing the
index does per ticket besides the model.

    .venv/bin/python benchmarks/dedupe_embed_speed.py [--rounds 3] [--n 512]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.dedupe.evaluation import load_dataset  # noqa: E402
from services.dedupe.text import clean, for_embedding, tokens  # noqa: E402
from shared.embeddings import MiniLMEmbedder, MiniLMOptions, content_hash  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args()
    data = load_dataset(DATA / "issues.csv", DATA / "duplicate_pairs.csv")
    sample = data.tickets[:: max(1, len(data.tickets) // args.n)][: args.n]
    raw = [t["summary"] + "\n" + t["description"] for t in sample]
    cleaned = [for_embedding(clean(t["summary"]), clean(t["description"])) for t in sample]
    variants = {
        "plain fp32, 256 tokens, raw text": (MiniLMEmbedder(MiniLMOptions(max_tokens=256, quantize=False)), raw),
        "fp32, 128 tokens, cleaned": (MiniLMEmbedder(MiniLMOptions(max_tokens=128, quantize=False)), cleaned),
        "int8, 128 tokens, cleaned": (MiniLMEmbedder(MiniLMOptions(max_tokens=128, quantize=True)), cleaned),
        "int8, 96 tokens, cleaned (dedupe default)": (MiniLMEmbedder(MiniLMOptions(max_tokens=96, quantize=True)),
                                                      cleaned),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (emb, texts) in variants.items():
            t0 = time.perf_counter()
            emb.embed(texts)
            rates[name].append(len(texts) / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    for t in sample:  # what the index does per ticket besides the model
        text = for_embedding(clean(t["summary"]), clean(t["description"]))
        tokens(t["summary"])
        tokens(for_embedding("", clean(t["description"]), 6000))
        content_hash("m", text)
    prep = len(sample) / (time.perf_counter() - t0)
    a = variants["fp32, 128 tokens, cleaned"][0].embed(cleaned[:128])
    b = variants["int8, 128 tokens, cleaned"][0].embed(cleaned[:128])
    out = {"torch_threads": torch.get_num_threads(), "tickets": len(sample), "rounds": args.rounds,
           "median_tickets_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
           "all_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
           "text_prep_tickets_per_s": round(prep, 1), "load_average_1m": os.getloadavg()[0],
           "int8_vs_fp32_cosine_mean": round(float(np.mean(np.sum(a * b, axis=1))), 4)}
    print(json.dumps(out, indent=2))
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "dedupe_embed_speed.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
