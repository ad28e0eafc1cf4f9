"""The budget ledger in PostgreSQL: property-based interleavings, real concurrency, stale-reservation settlement."""
from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from psycopg.rows import dict_row

from services.guardrails import repository as repo
from services.guardrails import service

THRESHOLDS = (50, 80, 100)


def make_run(conn: psycopg.Connection[Any], task: str, limit: int, tokens: int) -> uuid.UUID:
    run_id = uuid.uuid4()
    repo.run_insert(conn, run_id=run_id, task=task, trigger="manual", workflow="t", external_id=None,
                    caller="test", budget_micros=limit, budget_tokens=tokens)
    repo.run_cap_insert(conn, run_id=run_id, task=task, limit_micros=limit, limit_tokens=tokens)
    return run_id


def period_caps(tag: str, task: str, monthly: int, daily: int, task_daily: int) -> list[dict[str, Any]]:
    return [{"key": f"monthly:{tag}", "scope": "monthly", "rank": 0, "task": None, "period": tag, "limit": monthly},
            {"key": f"daily:{tag}", "scope": "daily", "rank": 1, "task": None, "period": tag, "limit": daily},
            {"key": f"task:{task}:{tag}", "scope": "task_daily", "rank": 2, "task": task, "period": tag,
             "limit": task_daily}]


class LedgerMachine(RuleBasedStateMachine):
    """Any interleaving of reserve / settle / release / expire against a model of the caps."""

    database_url: str = ""
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.conn = psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row)
        self.tag = uuid.uuid4().hex[:10]
        self.limits = {f"monthly:{self.tag}": 60_000, f"daily:{self.tag}": 40_000,
                       f"task:a:{self.tag}": 25_000, f"task:b:{self.tag}": 30_000}
        self.runs: list[tuple[uuid.UUID, str]] = []
        for task, limit in (("a", 15_000), ("a", 20_000), ("b", 18_000)):
            rid = make_run(self.conn, task, limit, 10 ** 9)
            self.runs.append((rid, task))
            self.limits[f"run:{rid}"] = limit
        self.spent = {k: 0 for k in self.limits}
        self.reserved = {k: 0 for k in self.limits}
        self.open: dict[uuid.UUID, tuple[list[str], int]] = {}
        self.charged_total = 0

    def teardown(self) -> None:
        self.conn.close()

    def _keys(self, run_index: int) -> list[str]:
        rid, task = self.runs[run_index]
        return [f"monthly:{self.tag}", f"daily:{self.tag}", f"task:{task}:{self.tag}", f"run:{rid}"]

    @rule(target=reservations, run_index=st.integers(0, 2), amount=st.integers(0, 16_000))
    def reserve(self, run_index: int, amount: int) -> Any:
        rid, task = self.runs[run_index]
        keys = self._keys(run_index)
        fits = all(self.spent[k] + self.reserved[k] + amount <= self.limits[k] for k in keys)
        res_id = uuid.uuid4()
        r = repo.reserve(self.conn, reservation_id=res_id, run_id=rid, caller="t", model="m", amount_micros=amount,
                         tokens=1, caps=period_caps(self.tag, task, self.limits[keys[0]], self.limits[keys[1]],
                                                    self.limits[keys[2]]),
                         timeout_seconds=3600, audit={})
        # Exact: admitted if and only if the worst case fits every cap.
        assert r["ok"] == fits, (r, amount)
        if not fits:
            return None
        for k in keys:
            self.reserved[k] += amount
        self.open[res_id] = (keys, amount)
        return res_id

    def _close(self, res_id: uuid.UUID | None, state: str, cost: int) -> None:
        if res_id is None or res_id not in self.open:
            return
        keys, amount = self.open.pop(res_id)
        r = repo.settle(self.conn, reservation_id=res_id, state=state, cost_micros=cost, used_tokens=1,
                        thresholds=THRESHOLDS, audit_kind="llm.call", audit={})
        assert r["ok"]
        for k in keys:
            self.reserved[k] -= amount
            self.spent[k] += cost
        self.charged_total += cost
        # Closing twice changes nothing.
        again = repo.settle(self.conn, reservation_id=res_id, state="settled", cost_micros=cost, used_tokens=1,
                            thresholds=THRESHOLDS, audit_kind="llm.call", audit={})
        assert not again["ok"]

    @rule(res_id=consumes(reservations), fraction=st.fractions(0, 1))
    def settle(self, res_id: uuid.UUID | None, fraction: Any) -> None:
        if res_id is not None:
            self._close(res_id, "settled", int(self.open[res_id][1] * fraction) if res_id in self.open else 0)

    @rule(res_id=consumes(reservations))
    def release(self, res_id: uuid.UUID | None) -> None:
        self._close(res_id, "released", 0)

    @rule(res_id=consumes(reservations))
    def expire(self, res_id: uuid.UUID | None) -> None:
        if res_id is not None and res_id in self.open:
            self._close(res_id, "expired", self.open[res_id][1])

    @invariant()
    def caps_hold_and_every_cent_is_accounted_for(self) -> None:
        rows = {r["key"]: r for r in repo.caps_get(self.conn, list(self.limits))}
        for key, limit in self.limits.items():
            row = rows.get(key)
            spent, reserved = (row["spent_micros"], row["reserved_micros"]) if row else (0, 0)
            assert spent + reserved <= limit, key
            assert (spent, reserved) == (self.spent[key], self.reserved[key]), key
        # Every micro-dollar charged is in the monthly cap, and the reservations table agrees.
        agg = self.conn.execute(
            "SELECT coalesce(sum(cost_micros) FILTER (WHERE state <> 'open'), 0) AS charged, "
            "coalesce(sum(amount_micros) FILTER (WHERE state = 'open'), 0) AS held FROM guardrails.reservations "
            "WHERE cap_keys[1] = %s", (f"monthly:{self.tag}",)).fetchone()
        assert agg["charged"] == self.charged_total == self.spent[f"monthly:{self.tag}"]
        assert agg["held"] == self.reserved[f"monthly:{self.tag}"]


def test_ledger_properties(database_url: str) -> None:
    LedgerMachine.database_url = database_url
    run = LedgerMachine.TestCase
    run.settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    run().runTest()


def test_concurrent_reservations_never_pass_a_cap(database_url: str) -> None:
    """16 threads, each with its own connection, race for a daily cap that fits exactly 10 reservations.
    (Kept at 16 connections: the suite shares one PostgreSQL; benchmarks/guardrails_exactness.py runs 64.)"""
    tag = uuid.uuid4().hex[:10]
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        runs = [make_run(conn, "a", 10 ** 9, 10 ** 9) for _ in range(4)]
    caps = period_caps(tag, "a", 10 ** 9, 10_000, 10 ** 9)
    admitted: list[uuid.UUID] = []
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            run(i)
        except BaseException as exc:  # surfaced by the assertion below, not lost in the thread
            errors.append(exc)
            barrier.abort()

    def run(i: int) -> None:
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
            barrier.wait()
            for _ in range(9):
                rid = uuid.uuid4()
                r = repo.reserve(conn, reservation_id=rid, run_id=runs[i % 4], caller="t", model="m",
                                 amount_micros=1_000, tokens=1, caps=caps, timeout_seconds=60, audit={})
                if r["ok"]:
                    with lock:
                        admitted.append(rid)
                    # Settle half of them below the reservation: that room is reusable by later callers.
                    repo.settle(conn, reservation_id=rid, state="settled", cost_micros=1_000 if i % 2 else 500,
                                used_tokens=1, thresholds=THRESHOLDS, audit_kind="llm.call", audit={})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        cap = repo.caps_get(conn, [f"daily:{tag}"])[0]
        assert cap["reserved_micros"] == 0
        assert cap["spent_micros"] <= 10_000
        # Demand (144 calls) far exceeds the cap: it must be used up to within one call.
        assert cap["spent_micros"] > 10_000 - 1_000
        assert service.verify_audit(conn).ok


def test_stale_reservation_is_settled_at_its_full_amount(guardrails, sql) -> None:
    with guardrails.pool.connection() as conn:
        rid = make_run(conn, "triage", 100_000, 10 ** 6)
        res = uuid.uuid4()
        r = repo.reserve(conn, reservation_id=res, run_id=rid, caller="triage", model="claude-haiku-4-5",
                         amount_micros=7_777, tokens=1234, caps=service.period_caps(guardrails.policy, "triage"),
                         timeout_seconds=3600, audit={})
        assert r["ok"]
    # Not yet stale: the sweeper leaves it alone.
    assert service.sweep_expired(guardrails.pool, guardrails.policy) == 0
    sql.execute("UPDATE guardrails.reservations SET expires_at = now() - interval '1 second' WHERE id = %s", (res,))
    # (Another guardrails process sharing this database may sweep it first; the outcome is the same.)
    service.sweep_expired(guardrails.pool, guardrails.policy)
    row = sql.execute("SELECT state, cost_micros FROM guardrails.reservations WHERE id = %s", (res,)).fetchone()
    assert row == {"state": "expired", "cost_micros": 7_777}
    run_cap = sql.execute("SELECT * FROM guardrails.caps WHERE key = %s", (f"run:{rid}",)).fetchone()
    assert (run_cap["spent_micros"], run_cap["reserved_micros"], run_cap["spent_tokens"]) == (7_777, 0, 1234)
    daily = [c for c in service.budget_view(guardrails.policy, sql) if c["scope"] == "daily"][0]
    assert daily["spent_micros"] == 7_777 and daily["reserved_micros"] == 0
    # A late settlement from the vanished caller cannot lower the charge afterwards.
    with guardrails.pool.connection() as conn:
        late = repo.settle(conn, reservation_id=res, state="settled", cost_micros=10, used_tokens=1,
                           thresholds=THRESHOLDS, audit_kind="llm.call", audit={})
    assert late == {"ok": False, "reason": "already_expired", "cost": 7_777}
    kinds = [r["kind"] for r in sql.execute("SELECT kind FROM guardrails.audit_log ORDER BY seq").fetchall()]
    assert "llm.reservation_expired" in kinds


def test_concurrent_sweepers_settle_each_reservation_once(guardrails, sql) -> None:
    with guardrails.pool.connection() as conn:
        rid = make_run(conn, "triage", 500_000, 10 ** 6)
        for _ in range(30):
            assert repo.reserve(conn, reservation_id=uuid.uuid4(), run_id=rid, caller="t", model="m",
                                amount_micros=1_000, tokens=1, caps=service.period_caps(guardrails.policy, "triage"),
                                timeout_seconds=0, audit={})["ok"]
    counts: list[int] = []
    threads = [threading.Thread(target=lambda: counts.append(service.sweep_expired(guardrails.pool,
                                                                                   guardrails.policy, limit=7)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while service.sweep_expired(guardrails.pool, guardrails.policy):
        pass
    cap = sql.execute("SELECT * FROM guardrails.caps WHERE key = %s", (f"run:{rid}",)).fetchone()
    assert (cap["spent_micros"], cap["reserved_micros"]) == (30_000, 0)
    n = sql.execute("SELECT count(*) AS n FROM guardrails.audit_log WHERE kind = 'llm.reservation_expired'"
                    ).fetchone()["n"]
    assert n == 30


@pytest.mark.parametrize("amount", [0, 1])
def test_reserve_refuses_closed_runs_and_kill_switch(guardrails, amount) -> None:
    with guardrails.pool.connection() as conn:
        rid = make_run(conn, "triage", 100_000, 10 ** 6)
        caps = service.period_caps(guardrails.policy, "triage")
        repo.run_finish(conn, rid, status="succeeded", outcome={})
        r = repo.reserve(conn, reservation_id=uuid.uuid4(), run_id=rid, caller="t", model="m", amount_micros=amount,
                         tokens=1, caps=caps, timeout_seconds=60, audit={})
        assert r["reason"] == "run_closed"
        rid2 = make_run(conn, "triage", 100_000, 10 ** 6)
        repo.kill_switch_set(conn, engaged=True, actor="ops", reason="test")
        r = repo.reserve(conn, reservation_id=uuid.uuid4(), run_id=rid2, caller="t", model="m", amount_micros=amount,
                         tokens=1, caps=caps, timeout_seconds=60, audit={})
        assert r["reason"] == "kill_switch_engaged"
