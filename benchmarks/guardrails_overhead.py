"""Gateway overhead: latency added over calling the Anthropic emulator directly, gated calls per second, and CPU
time per gated call by part (load generator, emulator, gateway, PostgreSQL).

Direct and gated runs alternate (several rounds) so machine noise hits both alike; medians over rounds are
reported. `--baseline REF` also runs the gateway of an older commit (its code and migrations, same venv) in the
same rounds, so old and new are compared side by side under the same load. Goals: p50 <= 3 ms and p99 <= 15 ms
added, >= 500 gated calls/s on this 2-core machine (which also runs the emulator, PostgreSQL, this load
generator and, on a shared machine, other people's work — hence the CPU figures, which noise hardly moves).
Run: .venv/bin/python benchmarks/guardrails_overhead.py [--rounds 3] [--requests 400] [--baseline REF]
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from typing import Any

import urllib3

from guardrails_common import ROOT, TOKENS, CpuMeter, Stack, baseline_tree, percentile, save, stack

BODY = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "Classify ticket PAY-1042: payslip shows wrong tax."}]}
                  ).encode()
POLICY = {"limits": {"daily_usd": 1000, "monthly_usd": 10000, "reservation_timeout_seconds": 900},
          "tasks": {"bench": {"models": ["claude-haiku-4-5"], "triggers": ["manual"], "daily_usd": 1000,
                              "run_cap": {"usd": 1000, "tokens": 10 ** 12}}}}


def measure(url: str, headers: dict[str, str], concurrency: int, total: int, meter: CpuMeter,
            method: str = "POST") -> dict[str, Any]:
    """`total` requests from `concurrency` threads with keep-alive; per-request latency, throughput, CPU/call."""
    body = BODY if method == "POST" else None
    http = urllib3.PoolManager(maxsize=concurrency, retries=False)
    per = total // concurrency
    lat: list[float] = []
    gw_ms: list[float] = []
    errors = 0
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def worker() -> None:
        nonlocal errors
        mine: list[float] = []
        mine_gw: list[float] = []
        bad = 0
        barrier.wait()
        for _ in range(per):
            t0 = time.perf_counter()
            r = http.request(method, url, body=body, headers=headers)
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
        http.request(method, url, body=body, headers=headers)
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    cpu0 = meter.snapshot()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu = meter.per_call_ms(cpu0, meter.snapshot(), len(lat))
    out = {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "rps": len(lat) / elapsed,
           "errors": errors, "n": len(lat), "cpu_ms_per_call": cpu}
    if gw_ms:
        out["gateway_self_p50_ms"] = percentile(gw_ms, 50)
        out["gateway_self_p99_ms"] = percentile(gw_ms, 99)
    return out


def open_run(st: Stack) -> str:
    r = urllib3.PoolManager().request("POST", st.guardrails.url + "/v1/runs", headers={
        "Authorization": f"Bearer {TOKENS['triage']}", "content-type": "application/json"},
        body=json.dumps({"task": "bench", "trigger": "manual", "external_id": os.urandom(8).hex()}))
    assert r.status == 201, r.data
    return str(json.loads(r.data)["id"])


def gated(st: Stack, run_id: str) -> tuple[str, dict[str, str]]:
    return (st.guardrails.url + "/anthropic/v1/messages",
            {"x-api-key": TOKENS["triage"], "X-Metis-Run-Id": run_id, "anthropic-version": "2023-06-01",
             "content-type": "application/json"})


def summarise(rounds: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    def med(key: str, metric: str) -> float:
        return float(statistics.median(r[key][metric] for r in rounds))

    def med_cpu(key: str) -> dict[str, float]:
        parts = rounds[0][key]["cpu_ms_per_call"].keys()
        return {p: round(statistics.median(r[key]["cpu_ms_per_call"][p] for r in rounds), 3) for p in parts}

    out: dict[str, Any] = {}
    for conc in (1, 16):
        d50, d99 = med(f"direct_c{conc}", "p50_ms"), med(f"direct_c{conc}", "p99_ms")
        block: dict[str, Any] = {"direct_p50_ms": round(d50, 2), "direct_p99_ms": round(d99, 2),
                                 "direct_rps": round(med(f"direct_c{conc}", "rps"), 1),
                                 "direct_cpu_ms_per_call": med_cpu(f"direct_c{conc}")}
        for v in variants:
            key = f"{v}_c{conc}"
            g50, g99 = med(key, "p50_ms"), med(key, "p99_ms")
            cpu = med_cpu(key)
            gw_cpu = cpu["gateway"] + cpu["postgres"]
            block[v] = {
                "gated_p50_ms": round(g50, 2), "added_p50_ms": round(g50 - d50, 2),
                "gated_p99_ms": round(g99, 2), "added_p99_ms": round(g99 - d99, 2),
                "ratio_p50": round(g50 / d50, 2), "gated_rps": round(med(key, "rps"), 1),
                "gateway_self_p50_ms": round(med(key, "gateway_self_p50_ms"), 2),
                "gateway_self_p99_ms": round(med(key, "gateway_self_p99_ms"), 2),
                "cpu_ms_per_call": cpu,
                # What the gateway + its PostgreSQL work alone could sustain on 2 cores (CPU-bound estimate).
                "gateway_and_pg_cpu_ms_per_call": round(gw_cpu, 3),
                "capacity_2_cores_rps": round(2000 / gw_cpu, 0) if gw_cpu > 0 else None,
                "errors": sum(r[key]["errors"] for r in rounds)}
        out[f"c{conc}"] = block
    out["floor_healthz_c16"] = {"p50_ms": round(med("floor_healthz_c16", "p50_ms"), 2),
                                "rps": round(med("floor_healthz_c16", "rps"), 1),
                                "cpu_ms_per_call": med_cpu("floor_healthz_c16")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400, help="per measurement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--sync-commit", choices=("on", "off"), default="on",
                    help="METIS_LEDGER_SYNC_COMMIT of the gateway (on: durable reservations, the default)")
    ap.add_argument("--baseline", help="also run the gateway at this git ref (e.g. HEAD~3), side by side")
    ap.add_argument("--name", help="result file name (default guardrails_overhead_sync_<on|off>)")
    args = ap.parse_args()
    env = {"METIS_LEDGER_SYNC_COMMIT": args.sync_commit}
    trees = {"new": ROOT}
    if args.baseline:
        trees = {"old": baseline_tree(args.baseline), "new": ROOT}
        atexit.register(shutil.rmtree, trees["old"], True)
    rounds: list[dict[str, Any]] = []
    load_avg = [os.getloadavg()]
    idle: dict[str, Any] = {}
    with contextlib.ExitStack() as es:
        stacks = {v: es.enter_context(stack(POLICY, workers=args.workers, threads=args.threads, extra_env=env,
                                            code_root=root)) for v, root in trees.items()}
        meters = {v: CpuMeter(st) for v, st in stacks.items()}
        for m in meters.values():
            es.callback(m.close)
        idle = {v: m.calibrate(3.0) for v, m in meters.items()}
        first = next(iter(stacks.values()))
        direct = (first.anthropic_url + "/v1/messages",
                  {"x-api-key": first.anthropic_key, "anthropic-version": "2023-06-01",
                   "content-type": "application/json"})
        targets = {v: gated(st, open_run(st)) for v, st in stacks.items()}
        for i in range(args.rounds):
            row: dict[str, Any] = {}
            for conc in (1, 16):
                total = args.requests if conc > 1 else args.requests // 2
                order = list(targets) if i % 2 == 0 else list(reversed(targets))
                row[f"direct_c{conc}"] = measure(*direct, conc, total, meters[next(iter(stacks))])
                for v in order:
                    row[f"{v}_c{conc}"] = measure(*targets[v], conc, total, meters[v])
            # The floor of any request through gunicorn + Flask + the shared hooks: GET /healthz of the new gateway.
            row["floor_healthz_c16"] = measure(stacks["new"].guardrails.url + "/healthz", {}, 16, args.requests,
                                               meters["new"], method="GET")
            row["load_avg_1m"] = os.getloadavg()[0]
            rounds.append(row)
            print(f"round {i + 1}: " + json.dumps({k: {m: round(x, 2) for m, x in d.items() if isinstance(x, float)}
                                                  for k, d in row.items() if isinstance(d, dict)}), flush=True)
        load_avg.append(os.getloadavg())

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    summary: dict[str, Any] = {"rounds": args.rounds, "gunicorn": f"{args.workers} workers x {args.threads} threads",
                               "sync_commit": args.sync_commit, "commit": commit, "baseline": args.baseline,
                               "load_avg_start": load_avg[0], "load_avg_end": load_avg[-1],
                               "idle_cpu_ms_per_s": idle,
                               "cpu_note": "cpu_ms_per_call excludes what each idle stack burns anyway (background "
                                           "jobs, the emulator's poll loop; idle_cpu_ms_per_s); other_machine is "
                                           "everyone else's load during the measurement",
                               "load_avg_1m_per_round": [r["load_avg_1m"] for r in rounds],
                               **summarise(rounds, list(targets))}
    summary["raw"] = rounds
    print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=2))
    save(args.name or f"guardrails_overhead_sync_{args.sync_commit}", summary)


if __name__ == "__main__":
    main()
