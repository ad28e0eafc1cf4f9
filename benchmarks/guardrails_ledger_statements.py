"""Where the gateway's time goes in PostgreSQL: one round trip, one durable commit (the WAL flush every
reservation waits for), the reserve statement, the settle statement (with its audit entry) — wall p50 / p99 in
ms, and the mean CPU per statement of the PostgreSQL backend and of this client (psycopg), which the machine's
load moves much less than the wall times.

`--baseline REF` runs the same statements against a second database migrated with the SQL of an older commit,
interleaved round by round, so old and new ledger functions are compared side by side (medians over rounds).
Run: .venv/bin/python benchmarks/guardrails_ledger_statements.py [--n 300] [--rounds 3] [--baseline REF]
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from guardrails_common import ADMIN_URL, ROOT, _sched_cpu, baseline_tree, percentile, save
from services.guardrails import repository as repo
from shared import db

CAPS = [{"key": "monthly:b", "scope": "monthly", "rank": 0, "task": None, "period": "b", "limit": 10 ** 12},
        {"key": "daily:b", "scope": "daily", "rank": 1, "task": None, "period": "b", "limit": 10 ** 12},
        {"key": "task:t:b", "scope": "task_daily", "rank": 2, "task": "t", "period": "b", "limit": 10 ** 12}]


def timed(fn: Callable[[], Any], n: int, backend_pid: int) -> dict[str, float]:
    samples = []
    pg0, cpu0 = _sched_cpu(backend_pid), time.thread_time()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(percentile(samples, 50), 3), "p99_ms": round(percentile(samples, 99), 3),
            "pg_cpu_ms": round((_sched_cpu(backend_pid) - pg0) * 1000 / n, 3),
            "client_cpu_ms": round((time.thread_time() - cpu0) * 1000 / n, 3)}


@contextlib.contextmanager
def ledger_db(code_root: Path) -> Iterator[psycopg.Connection[Any]]:
    """A throw-away database with the guardrails migrations of `code_root`, and one open run."""
    name = f"metis_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        db.migrate(url, "guardrails", directory=code_root / "services" / "guardrails" / "migrations")
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            yield conn
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def one_round(conn: psycopg.Connection[Any], n: int) -> dict[str, dict[str, float]]:
    run_id = uuid.uuid4()
    repo.run_insert(conn, run_id=run_id, task="t", trigger="manual", workflow="", external_id=None,
                    caller="bench", budget_micros=10 ** 12, budget_tokens=10 ** 12)
    repo.run_cap_insert(conn, run_id=run_id, task="t", limit_micros=10 ** 12, limit_tokens=10 ** 12)
    ids: list[uuid.UUID] = []

    def reserve() -> None:
        rid = uuid.uuid4()
        ids.append(rid)
        repo.reserve(conn, reservation_id=rid, run_id=run_id, caller="bench", model="m", amount_micros=900,
                     tokens=300, caps=CAPS, timeout_seconds=900,
                     audit={"max_tokens": 100, "trigger": "manual", "input_bound": 200})

    row = conn.execute("SELECT pg_backend_pid() AS p").fetchone()
    assert row is not None
    pid = int(row["p"])
    out = {"round_trip": timed(lambda: conn.execute("SELECT 1").fetchone(), n, pid), "reserve": timed(reserve, n, pid)}
    durable = iter(list(ids))
    out["make_durable_wal_flush"] = timed(lambda: repo.make_durable(conn, next(durable)), n, pid)
    it = iter(ids)
    out["settle_with_audit"] = timed(lambda: repo.settle(
        conn, reservation_id=next(it), state="settled", cost_micros=400, used_tokens=120, thresholds=[50, 80, 100],
        audit_kind="llm.call", audit={"upstream_request_id": "req_0123456789", "latency_ms": 3.2,
                                      "usage": {"input": 20, "output": 100, "cache_write_5m": 0,
                                                "cache_write_1h": 0, "cache_read": 0},
                                      "cost_nanos_by_kind": {"input": 20000, "output": 500000},
                                      "stop_reason": "end_turn"}), n, pid)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", help="also run the ledger SQL of this git ref, side by side")
    args = ap.parse_args()
    trees = {"new": ROOT} if not args.baseline else {"old": baseline_tree(args.baseline), "new": ROOT}
    if args.baseline:
        atexit.register(shutil.rmtree, trees["old"], True)
    load = [list(os.getloadavg())]
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {v: [] for v in trees}
    with contextlib.ExitStack() as es:
        conns = {v: es.enter_context(ledger_db(root)) for v, root in trees.items()}
        for i in range(args.rounds):
            for v in (list(trees) if i % 2 == 0 else list(reversed(trees))):
                rounds[v].append(one_round(conns[v], args.n))
    results: dict[str, Any] = {"n": args.n, "rounds": args.rounds, "baseline": args.baseline,
                               "load_avg_start": load[0], "load_avg_end": list(os.getloadavg())}
    for v, rs in rounds.items():
        results[v] = {stmt: {m: round(statistics.median(r[stmt][m] for r in rs), 3) for m in rs[0][stmt]}
                      for stmt in rs[0]}
    for v in trees:
        for k, x in results[v].items():
            print(f"{v:4} {k:24} p50 {x['p50_ms']:7.3f} ms   p99 {x['p99_ms']:7.3f} ms   "
                  f"PostgreSQL CPU {x['pg_cpu_ms']:6.3f} ms   client CPU {x['client_cpu_ms']:6.3f} ms")
    results["raw"] = rounds
    save("guardrails_ledger_statements", results)


if __name__ == "__main__":
    main()
