"""Cost of LLM-mode triage with prompt caching, measured with the Anthropic emulator's caching accounting.

A steady stream of real ticket texts (gitbugs-hadoop, CC BY 4.0) is triaged by the production code path
(`services.triage.service.triage` → the real `anthropic` SDK → the emulator), with each ticket's five
nearest earlier resolved tickets as evidence (TF-IDF here, so the prompt has realistic size). Arrivals are
Poisson with a given mean interval on the emulator's clock, so the 5-minute cache TTL behaves as in
production. The same calls are then replayed with the cache breakpoint removed, and both are priced from
config/prices.yaml.

    .venv/bin/python benchmarks/triage_cost.py --tickets 200 --interval 120 --interval 30 --interval 600
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import anthropic
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.triage import service  # noqa: E402
from services.triage.config import default_model, load_prices, load_taxonomy, load_triage_config  # noqa: E402
from services.triage.prompt import build_prefix, build_tool  # noqa: E402
from tests.fixtures.emulators import start_emulators, stop_emulators  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop" / "issues.csv"


def load_stream(n: int, seed: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """n tickets (the most recent) with their 5 nearest earlier resolved tickets as evidence."""
    csv.field_size_limit(sys.maxsize)
    rows = list(csv.DictReader(open(DATA, newline="", encoding="utf-8")))
    texts = [f"{r['Summary']}\n{r['Description']}" for r in rows]
    vec = TfidfVectorizer(max_features=50000, sublinear_tf=True).fit_transform(texts)
    resolved = np.array([bool(r["Resolution"]) and r["Resolution"] not in ("Duplicate", "Won't Fix") for r in rows])
    order = list(range(len(rows) - n, len(rows)))
    stream = []
    for i in order:
        sims = (vec[:i] @ vec[i].T).toarray().ravel()
        sims[~resolved[:i]] = -1
        top = np.argsort(-sims)[:5]
        ev = [{"key": f"HADOOP-{rows[j]['Issue id']}", "score": float(round(sims[j], 3)),
               "summary": rows[j]["Summary"], "resolution": rows[j]["Description"][:400] or rows[j]["Resolution"],
               "priority": rows[j]["Priority"], "labels": [], "components": []} for j in top if sims[j] > 0]
        stream.append(({"key": f"HADOOP-{i + 1}", "summary": rows[i]["Summary"], "description": rows[i]["Description"],
                        "issue_type": "Bug"}, ev))
    random.Random(seed).shuffle(stream)
    return stream


def strip_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The same request without any cache breakpoint (the 'no caching' counterfactual)."""
    out = dict(kwargs)
    out["system"] = [{k: v for k, v in b.items() if k != "cache_control"} for b in kwargs["system"]]
    return out


def run(emu: Any, stream: list[tuple[dict[str, Any], list[dict[str, Any]]]], *, interval: float, cache: bool,
        seed: int, ttl: str) -> dict[str, Any]:
    taxonomy = load_taxonomy(ROOT / "config" / "taxonomy.yaml")
    cfg = dataclasses.replace(load_triage_config(ROOT / "config" / "triage.yaml", taxonomy), llm_cache_ttl=ttl)
    prices = load_prices(ROOT / "config")
    model = default_model(ROOT / "config", cfg)
    emu.reset()
    # Realistic answers: the worked examples' tool inputs, in turn (what a model writes is about this long).
    answers = [dict(ex.answer, references=[]) for ex in cfg.examples if not ex.answer["needs_human"]]
    emu.script_anthropic([{"tool_input": answers[i % len(answers)]} for i in range(len(stream))])
    client = anthropic.Anthropic(base_url=emu.anthropic_url, api_key=emu.anthropic_key, max_retries=0)

    def for_run(_: str) -> service.MessagesCreate:
        def create(**kwargs: Any) -> tuple[Any, float | None]:
            return client.messages.create(**(kwargs if cache else strip_cache(kwargs))), None
        return create

    deps_base = dict(taxonomy=taxonomy, cfg=cfg, prefix=build_prefix(taxonomy, cfg), tool=build_tool(taxonomy, cfg),
                     model=model, prices=prices, duplicates=lambda t: None, llm=for_run)
    rng = random.Random(seed)
    totals = service.Usage()
    per_triage: list[float] = []
    modes = []
    for ticket, evidence in stream:
        emu.advance_anthropic_clock(rng.expovariate(1.0 / interval))
        deps = service.TriageDeps(similar=lambda t, ev=evidence: ev, **deps_base)  # type: ignore[misc, arg-type]
        out = service.triage(ticket=service.normalize_ticket(ticket, cfg), run_id="bench", deps=deps)
        modes.append(out.mode)
        u = out.usage
        totals.calls += u.calls
        totals.input_tokens += u.input_tokens
        totals.output_tokens += u.output_tokens
        totals.cache_creation_input_tokens += u.cache_creation_input_tokens
        totals.cache_read_input_tokens += u.cache_read_input_tokens
        totals.cost_usd += u.cost_usd
        per_triage.append(u.cost_usd)
    all_input = totals.input_tokens + totals.cache_creation_input_tokens + totals.cache_read_input_tokens
    return {"cache": cache, "ttl": ttl if cache else None, "interval_s": interval, "triages": len(stream), "llm_calls": totals.calls,
            "llm_mode": modes.count("llm"), "input_tokens_total": all_input,
            "uncached_input": totals.input_tokens, "cache_write": totals.cache_creation_input_tokens,
            "cache_read": totals.cache_read_input_tokens, "output_tokens": totals.output_tokens,
            "cache_read_share": round(totals.cache_read_input_tokens / all_input, 4) if all_input else 0.0,
            "usd_total": round(totals.cost_usd, 6), "usd_per_triage_mean": round(totals.cost_usd / len(stream), 6),
            "usd_per_triage_median": round(float(np.median(per_triage)), 6), "model": model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tickets", type=int, default=200)
    ap.add_argument("--interval", type=float, action="append", help="mean seconds between tickets (repeatable)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--ttl", action="append", choices=["5m", "1h"], help="cache TTLs to compare (default both)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    intervals = args.interval or [120.0]
    stream = load_stream(args.tickets, args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="triage-cost-") as tmp:
        emu = start_emulators(Path(tmp))
        try:
            for interval in intervals:
              plain = run(emu, stream, interval=interval, cache=False, seed=args.seed, ttl="5m")
              for ttl in args.ttl or ["5m", "1h"]:
                cached = run(emu, stream, interval=interval, cache=True, seed=args.seed, ttl=ttl)
                ratio = cached["usd_total"] / plain["usd_total"]
                results.append({"interval_s": interval, "ttl": ttl, "cached": cached, "uncached": plain,
                                "cost_ratio": round(ratio, 4)})
                print(f"mean interval {interval:>5.0f} s, TTL {ttl}, {cached['triages']} triages on {cached['model']}: "
                      f"{cached['cache_read_share']:.1%} of input tokens read from cache "
                      f"(written {cached['cache_write']}, read {cached['cache_read']}, uncached {cached['uncached_input']},"
                      f" output {cached['output_tokens']}); cost ${cached['usd_total']:.4f} vs "
                      f"${plain['usd_total']:.4f} uncached = {ratio:.1%}; per triage "
                      f"${cached['usd_per_triage_mean']:.5f} mean / ${cached['usd_per_triage_median']:.5f} median "
                      f"(uncached ${plain['usd_per_triage_mean']:.5f})")
        finally:
            stop_emulators(emu)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
