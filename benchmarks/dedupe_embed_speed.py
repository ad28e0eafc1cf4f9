"""Embedding throughput side by side on this CPU: what dedupe ran before (torch dynamic int8) vs ONNX Runtime.

All variants run in one process, one thread each (as in a gunicorn worker), on the same gitbugs-hadoop
tickets, interleaved round by round so a noisy shared machine slows them alike; medians are reported,
in tickets per wall-second and per CPU-second of this process (the second is what a worker would get
from an idle core). Also: fidelity to fp32 sentence-transformers at the same window (cosine), single-text
latency (a query), and whether a text's vector depends on its batch-mates.

    .venv/bin/python benchmarks/dedupe_embed_speed.py [--rounds 3] [--n 512] [--plain]

--plain adds the issue's reference (fp32, 256 tokens, raw text; ~4 tickets/s: slow).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.dedupe.config import load_config  # noqa: E402
from services.dedupe.evaluation import load_dataset  # noqa: E402
from services.dedupe.text import clean, for_embedding, tokens  # noqa: E402
from shared.embeddings import MiniLMEmbedder, MiniLMOptions, OnnxMiniLMEmbedder, content_hash  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop"
OUT = ROOT / "benchmarks" / "results" / "dedupe_embed_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "config")
    data = load_dataset(DATA / "issues.csv", DATA / "duplicate_pairs.csv")
    sample = data.tickets[:: max(1, len(data.tickets) // args.n)][: args.n]
    raw = [t["summary"] + "\n" + t["description"] for t in sample]
    cleaned = [for_embedding(clean(t["summary"]), clean(t["description"])) for t in sample]
    w = cfg.embedding.max_tokens
    old = MiniLMOptions(max_tokens=w, quantize=True, threads=1, batch_size=16, backend="torch")
    variants: dict[str, tuple[object, list[str]]] = {
        f"before: torch int8 dynamic, {w} tokens, batches of 16": (MiniLMEmbedder(old), cleaned),
        f"onnx int8 per-channel, {w} tokens, one text per run (shipped)":
            (OnnxMiniLMEmbedder(MiniLMOptions(max_tokens=w, threads=1, batch_size=1, backend="onnx")), cleaned),
        f"onnx int8 per-channel, {w} tokens, batches of 8":
            (OnnxMiniLMEmbedder(MiniLMOptions(max_tokens=w, threads=1, batch_size=8, backend="onnx")), cleaned),
    }
    if args.plain:
        variants = {"plain fp32, 256 tokens, raw text": (MiniLMEmbedder(MiniLMOptions(max_tokens=256, quantize=False,
                                                                                       threads=1)), raw),
                    **variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    vectors: dict[str, np.ndarray] = {}
    loads = []
    for _ in range(args.rounds):
        for name, (emb, texts) in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            vectors[name] = emb.embed(texts)  # type: ignore[attr-defined]
            wall[name].append(len(texts) / (time.perf_counter() - t0))
            cpu[name].append(len(texts) / (time.process_time() - c0))
        loads.append(os.getloadavg()[0])
    reference = MiniLMEmbedder(MiniLMOptions(max_tokens=w, quantize=False, threads=1)).embed(cleaned)
    single: dict[str, float] = {}
    for name, (emb, texts) in variants.items():
        if "plain" in name:
            continue
        lat = []
        for t in texts[:60]:
            c0 = time.process_time()
            emb.embed([t])  # type: ignore[attr-defined]
            lat.append((time.process_time() - c0) * 1000)
        single[name] = round(statistics.median(lat), 2)

    def batch_dependence(emb: object) -> float:
        alone = emb.embed(cleaned[:1])[0]  # type: ignore[attr-defined]
        together = emb.embed(cleaned[:32])[0]  # type: ignore[attr-defined]
        return round(float(np.abs(alone - together).max()), 5)

    t0 = time.perf_counter()
    for t in sample:  # what the index does per ticket besides the model
        text = for_embedding(clean(t["summary"]), clean(t["description"]))
        tokens(t["summary"])
        tokens(for_embedding("", clean(t["description"]), 6000))
        content_hash("m", text)
    prep = len(sample) / (time.perf_counter() - t0)
    out = {
        "tickets": len(sample), "rounds": args.rounds, "threads_per_model": 1,
        "load_average_1m_per_round": loads,
        "median_tickets_per_wall_s": {k: round(statistics.median(v), 1) for k, v in wall.items()},
        "median_tickets_per_cpu_s": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
        "all_rounds_wall": {k: [round(x, 1) for x in v] for k, v in wall.items()},
        "single_text_cpu_ms_median": single,
        "cosine_to_fp32_same_window": {k: {"mean": round(float(np.mean(np.sum(v * reference, 1))), 4),
                                           "min": round(float(np.min(np.sum(v * reference, 1))), 4)}
                                       for k, v in vectors.items() if "plain" not in k},
        "max_abs_change_of_a_vector_alone_vs_in_a_batch": {k: batch_dependence(e) for k, (e, _) in variants.items()
                                                           if "plain" not in k},
        "text_prep_tickets_per_s": round(prep, 1),
    }
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
