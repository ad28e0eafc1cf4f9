"""Exactness under load: 64 concurrent callers race a daily cap that fits exactly N calls.

Every call's settled cost is scripted to equal its worst-case reservation W, and the daily cap is N x W, so
a correct gateway admits exactly N calls and final spend == cap; an inexact one overspends (the popular
open-source gateway overspends by 75-900 % in this test at concurrency 50). Each repetition starts from
an empty ledger. Run: .venv/bin/python benchmarks/guardrails_exactness.py [--reps 5] [--n 200]
"""
from __future__ import annotations

import argparse
import os
import json
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import urllib3

from guardrails_common import TOKENS, save, stack

MODEL = "claude-haiku-4-5"
MAX_TOKENS = 100
BODY = json.dumps({"model": MODEL, "max_tokens": MAX_TOKENS,
                   "messages": [{"role": "user", "content": "Classify ticket PAY-1042: payslip shows wrong tax."}]}
                  ).encode()


def worst_case(overhead: int) -> tuple[int, int]:
    """(input bound, W in micro-USD) exactly as the gateway computes them for BODY (haiku 4.5 prices)."""
    from services.guardrails.gateway import worst_case_micros
    from services.guardrails.policy import load_policy
    from guardrails_common import ROOT

    price = load_policy(ROOT / "config").prices[MODEL]
    bound = len(BODY) + overhead
    return bound, worst_case_micros(price, bound, MAX_TOKENS)


def run_rep(st: Any, callers: int, emu_http: urllib3.PoolManager, bound: int, fraction: float) -> dict[str, Any]:
    with st.sql() as conn:
        # CASCADE: the write-proposal tables (actions, ...) reference runs; a fresh ledger for every repetition.
        conn.execute("TRUNCATE guardrails.caps, guardrails.reservations, guardrails.runs, guardrails.audit_log, "
                     "guardrails.audit_head, guardrails.alert_outbox CASCADE")
    # fraction 1: every call costs exactly its reservation (all input billed as 1h cache writes, all output
    # used), so exactly N fit. Below 1, calls cost less than reserved and more than N fit; the cap is used up
    # to the last worst case that no longer fits.
    emu_http.request("POST", st.anthropic_url + "/_emulator/reset")
    emu_http.request("POST", st.anthropic_url + "/_emulator/anthropic/script", headers={"content-type": "application/json"},
                     body=json.dumps({"steps": [{"times": 10 ** 6, "usage": {
                         "input_tokens": 0, "output_tokens": round(MAX_TOKENS * fraction), "cache_read_input_tokens": 0,
                         "cache_creation_input_tokens": round(bound * fraction),
                         "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                            "ephemeral_1h_input_tokens": round(bound * fraction)}}}]}))
    http = urllib3.PoolManager(maxsize=callers, retries=False)
    base = st.guardrails.url
    auth = {"Authorization": f"Bearer {TOKENS['triage']}", "content-type": "application/json"}
    runs = []
    for _ in range(callers):
        r = http.request("POST", base + "/v1/runs", headers=auth,
                         body=json.dumps({"task": "bench", "trigger": "manual", "external_id": uuid.uuid4().hex}))
        assert r.status == 201, r.data
        runs.append(json.loads(r.data)["id"])
    counts = {"ok": 0, "denied": 0, "other": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(callers)

    def caller(run_id: str) -> None:
        headers = {"x-api-key": TOKENS["triage"], "X-Metis-Run-Id": run_id, "content-type": "application/json",
                   "anthropic-version": "2023-06-01"}
        barrier.wait()
        while True:
            r = http.request("POST", base + "/anthropic/v1/messages", body=BODY, headers=headers)
            key = "ok" if r.status == 200 else ("denied" if r.status == 403 else "other")
            with lock:
                counts[key] += 1
            if key != "ok":
                return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(rid,)) for rid in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    with st.sql() as conn:
        spent, reserved, limit = conn.execute(
            "SELECT spent_micros, reserved_micros, limit_micros FROM guardrails.caps WHERE scope = 'daily'").fetchone()
        verify_rows = conn.execute("SELECT count(*) FROM guardrails.audit_log WHERE kind = 'llm.call'").fetchone()[0]
    return {"ok_calls": counts["ok"], "denied": counts["denied"], "other_errors": counts["other"],
            "spent_micros": spent, "reserved_micros": reserved, "cap_micros": limit,
            "used_ratio": spent / limit, "overspend_micros": max(0, spent - limit), "seconds": round(elapsed, 2),
            "audited_calls": verify_rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=200, help="calls the daily cap fits exactly")
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--actual-fraction", type=float, default=1.0,
                    help="settled cost / worst case of each call (1.0: exactly N calls fit)")
    args = ap.parse_args()
    from services.guardrails.policy import load_policy
    from guardrails_common import ROOT

    overhead = load_policy(ROOT / "config").request_overhead_tokens
    bound, w = worst_case(overhead)
    cap = Decimal(args.n * w) / Decimal(10 ** 6)
    policy = {"limits": {"daily_usd": float(cap) if cap == Decimal(str(float(cap))) else str(cap),
                         "monthly_usd": 1000, "reservation_timeout_seconds": 900},
              "tasks": {"bench": {"models": [MODEL], "triggers": ["manual"], "daily_usd": str(cap),
                                  "run_cap": {"usd": str(cap), "tokens": 10 ** 9}}}}
    results = []
    with stack(policy) as st:
        emu_http = urllib3.PoolManager()
        for rep in range(args.reps):
            res = run_rep(st, args.callers, emu_http, bound, args.actual_fraction)
            results.append(res)
            print(f"rep {rep + 1}: {res}", flush=True)
    summary = {
        "load_avg": list(os.getloadavg()), "callers": args.callers, "n_fitting_at_worst_case": args.n, "worst_case_micros_per_call": w,
        "actual_fraction": args.actual_fraction,
        "every_rep_within_cap": all(r["spent_micros"] <= r["cap_micros"] for r in results),
        "min_used_ratio": min(r["used_ratio"] for r in results),
        "ok_calls": [r["ok_calls"] for r in results], "reps": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "reps"}, indent=2))
    save("guardrails_exactness" + ("" if args.actual_fraction == 1.0 else f"_fraction_{args.actual_fraction}"),
         summary)


if __name__ == "__main__":
    main()
