"""Gateway overhead: latency added over calling the Anthropic emulator directly, and gated calls per second.

Direct and gated runs alternate (several rounds) so machine noise hits both alike; medians over rounds are
reported. Goals: p50 <= 3 ms and p99 <= 15 ms added, >= 500 gated calls/s on this 2-core machine (which
also runs the emulator, PostgreSQL and this load generator).
Run: .venv/bin/python benchmarks/guardrails_overhead.py [--rounds 3] [--requests 400]
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from typing import Any

import urllib3

from guardrails_common import TOKENS, percentile, save, stack

BODY = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "Classify ticket PAY-1042: payslip shows wrong tax."}]}
                  ).encode()


def measure(url: str, headers: dict[str, str], concurrency: int, total: int) -> dict[str, Any]:
    """`total` requests from `concurrency` threads with keep-alive; per-request latency and throughput."""
    http = urllib3.PoolManager(maxsize=concurrency, retries=False)
    per = total // concurrency
    lat: list[float] = []
    gw_ms: list[float] = []
    errors = 0
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency)

    def worker() -> None:
        nonlocal errors
        mine: list[float] = []
        mine_gw: list[float] = []
        bad = 0
        barrier.wait()
        for _ in range(per):
            t0 = time.perf_counter()
            r = http.request("POST", url, body=BODY, headers=headers)
            mine.append((time.perf_counter() - t0) * 1000)
            if r.status != 200:
                bad += 1
            if "X-Metis-Gateway-Ms" in r.headers:
                mine_gw.append(float(r.headers["X-Metis-Gateway-Ms"]))
        with lock:
            lat.extend(mine)
            gw_ms.extend(mine_gw)
            errors += bad

    # Warm-up: connections and caches on both sides.
    for _ in range(20):
        http.request("POST", url, body=BODY, headers=headers)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    out = {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "rps": len(lat) / elapsed,
           "errors": errors, "n": len(lat)}
    if gw_ms:
        out["gateway_self_p50_ms"] = percentile(gw_ms, 50)
        out["gateway_self_p99_ms"] = percentile(gw_ms, 99)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400, help="per measurement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--sync-commit", choices=("on", "off"), default="on",
                    help="METIS_LEDGER_SYNC_COMMIT of the gateway (on: durable reservations, the default)")
    args = ap.parse_args()
    policy = {"limits": {"daily_usd": 1000, "monthly_usd": 10000, "reservation_timeout_seconds": 900},
              "tasks": {"bench": {"models": ["claude-haiku-4-5"], "triggers": ["manual"], "daily_usd": 1000,
                                  "run_cap": {"usd": 1000, "tokens": 10 ** 12}}}}
    rounds: list[dict[str, Any]] = []
    with stack(policy, workers=args.workers, threads=args.threads,
               extra_env={"METIS_LEDGER_SYNC_COMMIT": args.sync_commit}) as st:
        http = urllib3.PoolManager()
        r = http.request("POST", st.guardrails.url + "/v1/runs", headers={
            "Authorization": f"Bearer {TOKENS['triage']}", "content-type": "application/json"},
            body=json.dumps({"task": "bench", "trigger": "manual", "external_id": uuid.uuid4().hex}))
        run_id = json.loads(r.data)["id"]
        direct = (st.anthropic_url + "/v1/messages",
                  {"x-api-key": st.anthropic_key, "anthropic-version": "2023-06-01", "content-type": "application/json"})
        gated = (st.guardrails.url + "/anthropic/v1/messages",
                 {"x-api-key": TOKENS["triage"], "X-Metis-Run-Id": run_id, "anthropic-version": "2023-06-01",
                  "content-type": "application/json"})
        for i in range(args.rounds):
            row: dict[str, Any] = {}
            for conc in (1, 16):
                total = args.requests if conc > 1 else args.requests // 2
                row[f"direct_c{conc}"] = measure(*direct, conc, total)
                row[f"gated_c{conc}"] = measure(*gated, conc, total)
            rounds.append(row)
            print(f"round {i + 1}: " + json.dumps({k: {m: round(v, 2) for m, v in d.items()} for k, d in row.items()}),
                  flush=True)

    def med(key: str, metric: str) -> float:
        return statistics.median(r[key][metric] for r in rounds)

    summary: dict[str, Any] = {"rounds": args.rounds, "gunicorn": f"{args.workers} workers x {args.threads} threads",
                               "sync_commit": args.sync_commit}
    for conc in (1, 16):
        d50, g50 = med(f"direct_c{conc}", "p50_ms"), med(f"gated_c{conc}", "p50_ms")
        d99, g99 = med(f"direct_c{conc}", "p99_ms"), med(f"gated_c{conc}", "p99_ms")
        summary[f"c{conc}"] = {
            "direct_p50_ms": round(d50, 2), "gated_p50_ms": round(g50, 2), "added_p50_ms": round(g50 - d50, 2),
            "direct_p99_ms": round(d99, 2), "gated_p99_ms": round(g99, 2), "added_p99_ms": round(g99 - d99, 2),
            "ratio_p50": round(g50 / d50, 2), "direct_rps": round(med(f"direct_c{conc}", "rps"), 1),
            "gated_rps": round(med(f"gated_c{conc}", "rps"), 1),
            "gateway_self_p50_ms": round(med(f"gated_c{conc}", "gateway_self_p50_ms"), 2),
            "gateway_self_p99_ms": round(med(f"gated_c{conc}", "gateway_self_p99_ms"), 2),
            "errors": sum(r[f"gated_c{conc}"]["errors"] + r[f"direct_c{conc}"]["errors"] for r in rounds)}
    summary["raw"] = rounds
    print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=2))
    save(f"guardrails_overhead_sync_{args.sync_commit}", summary)


if __name__ == "__main__":
    main()
