"""Where the gateway's time goes in PostgreSQL: one round trip, one durable commit (the WAL flush every
reservation waits for), the reserve statement, the settle statement — p50 / p99 in ms on this machine.

Run: .venv/bin/python benchmarks/guardrails_ledger_statements.py [--n 300]
"""
from __future__ import annotations

import argparse
import time
import uuid
from typing import Any, Callable

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from guardrails_common import ADMIN_URL, percentile, save
from services.guardrails import repository as repo
from shared import db


def timed(fn: Callable[[], Any], n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(percentile(samples, 50), 3), "p99_ms": round(percentile(samples, 99), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    name = f"metis_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        db.migrate(url, "guardrails")
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            run_id = uuid.uuid4()
            repo.run_insert(conn, run_id=run_id, task="t", trigger="manual", workflow="", external_id=None,
                            caller="bench", budget_micros=10 ** 12, budget_tokens=10 ** 12)
            repo.run_cap_insert(conn, run_id=run_id, task="t", limit_micros=10 ** 12, limit_tokens=10 ** 12)
            caps = [{"key": "monthly:b", "scope": "monthly", "rank": 0, "task": None, "period": "b", "limit": 10 ** 12},
                    {"key": "daily:b", "scope": "daily", "rank": 1, "task": None, "period": "b", "limit": 10 ** 12},
                    {"key": "task:t:b", "scope": "task_daily", "rank": 2, "task": "t", "period": "b",
                     "limit": 10 ** 12}]
            ids: list[uuid.UUID] = []

            def reserve() -> None:
                rid = uuid.uuid4()
                ids.append(rid)
                repo.reserve(conn, reservation_id=rid, run_id=run_id, caller="bench", model="m", amount_micros=900,
                             tokens=300, caps=caps, timeout_seconds=900, audit={"max_tokens": 100})

            results = {"round_trip": timed(lambda: conn.execute("SELECT 1").fetchone(), args.n),
                       "reserve": timed(reserve, args.n)}
            durable = iter(list(ids))
            results["make_durable_wal_flush"] = timed(lambda: repo.make_durable(conn, next(durable)), args.n)
            it = iter(ids)
            results["settle"] = timed(lambda: repo.settle(
                conn, reservation_id=next(it), state="settled", cost_micros=400, used_tokens=120,
                thresholds=[50, 80, 100], audit_kind="llm.call", audit={"usage": {"input": 20, "output": 100}}),
                args.n)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    for k, v in results.items():
        print(f"{k:22} p50 {v['p50_ms']:7.3f} ms   p99 {v['p99_ms']:7.3f} ms")
    save("guardrails_ledger_statements", results)


if __name__ == "__main__":
    main()
