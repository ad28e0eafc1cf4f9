"""SQL for the guardrails service: one function per query, schema-qualified, no commits (callers own the unit of work)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Iterator, Sequence

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

Row = dict[str, Any]

# ------------------------------------------------------------------ audit


def audit_append(conn: psycopg.Connection[Any], *, kind: str, actor: str, run_id: uuid.UUID | str | None = None,
                 task: str | None = None, subject: str = "", data: dict[str, Any] | None = None) -> int:
    """Append one hash-chained audit entry; returns its sequence number."""
    row = conn.execute("SELECT guardrails.audit_append(%s, %s, %s, %s, %s, %s) AS seq",
                       (kind, actor, run_id, task, subject, Jsonb(data or {}))).fetchone()
    assert row is not None
    return int(row["seq"])


def audit_query(conn: psycopg.Connection[Any], *, run_id: str | None, task: str | None, kind: str | None,
                since: datetime | None, until: datetime | None, after_seq: int | None,
                limit: int | None) -> Iterator[Row]:
    """Entries matching the filters, oldest first (a kind ending in '.' or '*' matches a prefix)."""
    where: list[str] = ["TRUE"]
    args: list[Any] = []
    if run_id:
        where.append("run_id = %s")
        args.append(run_id)
    if task:
        where.append("task = %s")
        args.append(task)
    if kind:
        if kind.endswith("*") or kind.endswith("."):
            where.append("kind LIKE %s")
            args.append(kind.rstrip("*").replace("%", r"\%").replace("_", r"\_") + "%")
        else:
            where.append("kind = %s")
            args.append(kind)
    if since:
        where.append("at >= %s")
        args.append(since)
    if until:
        where.append("at < %s")
        args.append(until)
    if after_seq is not None:
        where.append("seq > %s")
        args.append(after_seq)
    q = ("SELECT seq, at, kind, actor, run_id, task, subject, data, prev_hash, hash FROM guardrails.audit_log "
         f"WHERE {' AND '.join(where)} ORDER BY seq")
    if limit is not None:
        q += " LIMIT %s"
        args.append(limit)
    # A server-side cursor streams big logs; it needs a transaction (a savepoint if one is open already).
    with conn.transaction(), conn.cursor(name=f"audit_{uuid.uuid4().hex[:8]}") as cur:
        cur.itersize = 500
        cur.execute(q, args)
        yield from cur


def audit_chain(conn: psycopg.Connection[Any]) -> Iterator[Row]:
    """Every entry with the canonical text recomputed from its current column values, in seq order."""
    with conn.transaction(), conn.cursor(name=f"verify_{uuid.uuid4().hex[:8]}") as cur:
        cur.itersize = 2000
        cur.execute("SELECT seq, prev_hash, hash, guardrails.audit_canonical(seq, at, kind, actor, run_id, task, "
                    "subject, data) AS canonical FROM guardrails.audit_log ORDER BY seq")
        yield from cur


def audit_head(conn: psycopg.Connection[Any]) -> Row | None:
    return conn.execute("SELECT seq, hash FROM guardrails.audit_head WHERE id = 1").fetchone()


# ------------------------------------------------------------------ kill switch


def kill_switch_get(conn: psycopg.Connection[Any]) -> Row | None:
    return conn.execute("SELECT engaged, actor, reason, changed_at FROM guardrails.kill_switch WHERE id = 1").fetchone()


def kill_switch_set(conn: psycopg.Connection[Any], *, engaged: bool, actor: str, reason: str) -> Row | None:
    """Set the switch; returns the previous state (None if it was never set). Locks the row for the unit of work."""
    conn.execute("INSERT INTO guardrails.kill_switch (id, engaged, actor, reason) VALUES (1, false, 'system', "
                 "'initial') ON CONFLICT (id) DO NOTHING")
    prev = conn.execute("SELECT engaged, actor, reason, changed_at FROM guardrails.kill_switch WHERE id = 1 "
                        "FOR UPDATE").fetchone()
    conn.execute("UPDATE guardrails.kill_switch SET engaged = %s, actor = %s, reason = %s, changed_at = now() "
                 "WHERE id = 1", (engaged, actor, reason))
    return prev


# ------------------------------------------------------------------ policy versions


def policy_latest(conn: psycopg.Connection[Any]) -> Row | None:
    return conn.execute("SELECT version, digest FROM guardrails.policy_versions ORDER BY version DESC LIMIT 1"
                        ).fetchone()


def policy_document(conn: psycopg.Connection[Any], version: int) -> Row | None:
    return conn.execute("SELECT version, digest, document FROM guardrails.policy_versions WHERE version = %s",
                        (version,)).fetchone()


def policy_insert(conn: psycopg.Connection[Any], *, digest: str, document: dict[str, Any], actor: str) -> int:
    row = conn.execute("INSERT INTO guardrails.policy_versions (digest, document, actor) VALUES (%s, %s, %s) "
                       "RETURNING version", (digest, Jsonb(document), actor)).fetchone()
    assert row is not None
    return int(row["version"])


def advisory_xact_lock(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (name,))


# ------------------------------------------------------------------ runs and caps


def run_insert(conn: psycopg.Connection[Any], *, run_id: uuid.UUID, task: str, trigger: str, workflow: str,
               external_id: str | None, caller: str, budget_micros: int, budget_tokens: int) -> Row | None:
    """Insert a run unless (task, external_id) exists; None means it already existed."""
    return conn.execute(
        "INSERT INTO guardrails.runs (id, task, trigger, workflow, external_id, caller, budget_micros, budget_tokens) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (task, external_id) DO NOTHING RETURNING *",
        (run_id, task, trigger, workflow, external_id, caller, budget_micros, budget_tokens)).fetchone()


def run_cap_insert(conn: psycopg.Connection[Any], *, run_id: uuid.UUID, task: str, limit_micros: int,
                   limit_tokens: int) -> None:
    conn.execute("INSERT INTO guardrails.caps (key, scope, lock_rank, task, period, limit_micros, limit_tokens) "
                 "VALUES (%s, 'run', 3, %s, %s, %s, %s)",
                 (f"run:{run_id}", task, str(run_id), limit_micros, limit_tokens))


_RUN_SELECT = (
    "SELECT r.*, c.spent_micros, c.reserved_micros, c.spent_tokens, c.reserved_tokens "
    "FROM guardrails.runs r LEFT JOIN guardrails.caps c ON c.key = 'run:' || r.id::text ")


def run_get(conn: psycopg.Connection[Any], run_id: uuid.UUID | str, *, for_update: bool = False) -> Row | None:
    q = _RUN_SELECT + "WHERE r.id = %s"
    if for_update:
        q += " FOR UPDATE OF r"
    return conn.execute(q, (run_id,)).fetchone()


def run_by_external_id(conn: psycopg.Connection[Any], task: str, external_id: str) -> Row | None:
    return conn.execute(_RUN_SELECT + "WHERE r.task = %s AND r.external_id = %s", (task, external_id)).fetchone()


def run_finish(conn: psycopg.Connection[Any], run_id: uuid.UUID | str, *, status: str,
               outcome: dict[str, Any]) -> None:
    conn.execute("UPDATE guardrails.runs SET status = %s, outcome = %s, finished_at = now() WHERE id = %s",
                 (status, Jsonb(outcome), run_id))


def run_list(conn: psycopg.Connection[Any], *, task: str | None, status: str | None, trigger: str | None,
             since: datetime | None, limit: int) -> list[Row]:
    where: list[str] = ["TRUE"]
    args: list[Any] = []
    for col, val in (("r.task", task), ("r.status", status), ("r.trigger", trigger)):
        if val:
            where.append(f"{col} = %s")
            args.append(val)
    if since:
        where.append("r.opened_at >= %s")
        args.append(since)
    args.append(limit)
    return conn.execute(_RUN_SELECT + f"WHERE {' AND '.join(where)} ORDER BY r.opened_at DESC LIMIT %s",
                        args).fetchall()


def run_task(conn: psycopg.Connection[Any], run_id: uuid.UUID | str) -> Row | None:
    return conn.execute("SELECT task, trigger, status FROM guardrails.runs WHERE id = %s", (run_id,)).fetchone()


def caps_get(conn: psycopg.Connection[Any], keys: Sequence[str]) -> list[Row]:
    return conn.execute("SELECT * FROM guardrails.caps WHERE key = ANY(%s) ORDER BY lock_rank, key",
                        (list(keys),)).fetchall()


def caps_for_periods(conn: psycopg.Connection[Any], periods: Sequence[str]) -> list[Row]:
    return conn.execute("SELECT * FROM guardrails.caps WHERE scope <> 'run' AND period = ANY(%s) "
                        "ORDER BY lock_rank, key", (list(periods),)).fetchall()


def _hot_cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[tuple[Any, ...]]:
    """One reusable tuple-row cursor per connection for the per-call ledger statements (reserve, flush,
    settle): creating a cursor and a dict per row is a fifth of psycopg's client CPU for them. Safe because a
    connection serves one thread at a time (borrowed from the pool, or owned by its caller)."""
    cur = getattr(conn, "_metis_hot_cursor", None)
    if cur is None or cur.closed:
        cur = conn.cursor(row_factory=tuple_row)
        conn._metis_hot_cursor = cur  # type: ignore[attr-defined]
    return cur


def reserve(conn: psycopg.Connection[Any], *, reservation_id: uuid.UUID, run_id: uuid.UUID | str, caller: str,
            model: str, amount_micros: int, tokens: int, caps: list[dict[str, Any]] | str, timeout_seconds: int,
            audit: dict[str, Any]) -> dict[str, Any]:
    """The one atomic reservation (see migration 0002 `reserve`). `caps` may come as JSON text already."""
    row = _hot_cursor(conn).execute("SELECT guardrails.reserve(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                                    (reservation_id, run_id, caller, model, amount_micros, tokens,
                                     Jsonb(caps, dumps=_as_is) if isinstance(caps, str) else Jsonb(caps),
                                     timeout_seconds, Jsonb(audit)), prepare=True).fetchone()
    assert row is not None
    return dict(row[0])


def _as_is(text: str) -> str:
    return text


def make_durable(conn: psycopg.Connection[Any], reservation_id: uuid.UUID) -> None:
    """Return only once the reservation (committed asynchronously by `reserve`) is on disk.

    A transaction that writes WAL commits under this session's synchronous_commit=on, which flushes the WAL
    up to its own, later, commit record. (An xid alone writes no WAL and would not flush: it must write.)"""
    _hot_cursor(conn).execute("UPDATE guardrails.reservations SET created_at = created_at WHERE id = %s",
                              (reservation_id,), prepare=True)


def settle(conn: psycopg.Connection[Any], *, reservation_id: uuid.UUID | str, state: str, cost_micros: int,
           used_tokens: int, thresholds: Sequence[int], audit_kind: str, audit: dict[str, Any]) -> dict[str, Any]:
    """Close a reservation: settled / released / expired (see migration 0002 `settle`)."""
    row = _hot_cursor(conn).execute("SELECT guardrails.settle(%s, %s, %s, %s, %s, %s, %s)",
                                    (reservation_id, state, cost_micros, used_tokens, list(thresholds), audit_kind,
                                     Jsonb(audit)), prepare=True).fetchone()
    assert row is not None
    return dict(row[0])


def reservations_expired(conn: psycopg.Connection[Any], *, limit: int) -> list[Row]:
    """Open reservations past their deadline, skipping ones another worker is settling right now."""
    return conn.execute("SELECT id, amount_micros, tokens FROM guardrails.reservations "
                        "WHERE state = 'open' AND expires_at < now() ORDER BY expires_at LIMIT %s "
                        "FOR UPDATE SKIP LOCKED", (limit,)).fetchall()


def reservation_get(conn: psycopg.Connection[Any], reservation_id: uuid.UUID | str) -> Row | None:
    return conn.execute("SELECT * FROM guardrails.reservations WHERE id = %s", (reservation_id,)).fetchone()


def reservations_open_summary(conn: psycopg.Connection[Any]) -> Row:
    row = conn.execute("SELECT count(*) AS n, coalesce(sum(amount_micros), 0) AS micros "
                       "FROM guardrails.reservations WHERE state = 'open'").fetchone()
    assert row is not None
    return dict(row)


# ------------------------------------------------------------------ heartbeats


def heartbeats_ensure(conn: psycopg.Connection[Any], names: Sequence[str]) -> None:
    """Start the clock for configured heartbeats never seen (so one that never checks in becomes overdue)."""
    conn.execute("INSERT INTO guardrails.heartbeats (name, last_at) SELECT unnest(%s::text[]), now() "
                 "ON CONFLICT (name) DO NOTHING", (list(names),))


def heartbeat_beat(conn: psycopg.Connection[Any], name: str) -> Row:
    """Record a check-in; returns the row with `was_overdue_since` (the episode it ends, if any).
    Call inside a transaction: the row lock makes the overdue check and the reset one step."""
    prev = conn.execute("SELECT overdue_since FROM guardrails.heartbeats WHERE name = %s FOR UPDATE",
                        (name,)).fetchone()
    row = conn.execute(
        "INSERT INTO guardrails.heartbeats AS h (name, last_at, last_beat_at, beats) VALUES (%s, now(), now(), 1) "
        "ON CONFLICT (name) DO UPDATE SET last_at = now(), last_beat_at = now(), beats = h.beats + 1, "
        "overdue_since = NULL RETURNING h.*", (name,)).fetchone()
    assert row is not None
    return {**row, "was_overdue_since": prev["overdue_since"] if prev else None}


def heartbeats_all(conn: psycopg.Connection[Any]) -> list[Row]:
    return conn.execute("SELECT *, extract(epoch FROM now() - last_at) AS age_seconds "
                        "FROM guardrails.heartbeats ORDER BY name").fetchall()


def heartbeat_mark_overdue(conn: psycopg.Connection[Any], name: str, max_age_seconds: int) -> Row | None:
    """Open an overdue episode if the heartbeat is late and none is open; only one worker can win."""
    return conn.execute(
        "UPDATE guardrails.heartbeats SET overdue_since = now() WHERE name = %s AND overdue_since IS NULL "
        "AND last_at < now() - make_interval(secs => %s) RETURNING *", (name, max_age_seconds)).fetchone()


# ------------------------------------------------------------------ alert outbox


def alert_enqueue(conn: psycopg.Connection[Any], *, dedupe_key: str, kind: str, severity: str,
                  payload: dict[str, Any]) -> bool:
    """Queue an alert once per dedupe key; False if it was already queued."""
    row = conn.execute("INSERT INTO guardrails.alert_outbox (dedupe_key, kind, severity, payload) "
                       "VALUES (%s, %s, %s, %s) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
                       (dedupe_key, kind, severity, Jsonb(payload))).fetchone()
    return row is not None


def alerts_due(conn: psycopg.Connection[Any], *, limit: int) -> list[Row]:
    """Undelivered alerts whose time has come, locked so no other worker sends them concurrently."""
    return conn.execute("SELECT * FROM guardrails.alert_outbox WHERE delivered_at IS NULL AND next_attempt_at <= now() "
                        "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED", (limit,)).fetchall()


def alert_delivered(conn: psycopg.Connection[Any], alert_id: int) -> None:
    conn.execute("UPDATE guardrails.alert_outbox SET delivered_at = now(), attempts = attempts + 1, last_error = NULL "
                 "WHERE id = %s", (alert_id,))


def alert_failed(conn: psycopg.Connection[Any], alert_id: int, *, error: str, retry_in_seconds: float) -> None:
    conn.execute("UPDATE guardrails.alert_outbox SET attempts = attempts + 1, last_error = %s, "
                 "next_attempt_at = now() + make_interval(secs => %s) WHERE id = %s",
                 (error[:500], retry_in_seconds, alert_id))


def alerts_list(conn: psycopg.Connection[Any], *, pending_only: bool, limit: int) -> list[Row]:
    q = "SELECT * FROM guardrails.alert_outbox"
    if pending_only:
        q += " WHERE delivered_at IS NULL"
    return conn.execute(q + " ORDER BY id DESC LIMIT %s", (limit,)).fetchall()


# ------------------------------------------------------------------ watcher


def watcher_claim(conn: psycopg.Connection[Any], interval_seconds: float) -> bool:
    """True for exactly one worker per interval across all replicas."""
    conn.execute("INSERT INTO guardrails.watcher_state (id, last_ping_at) VALUES (1, '-infinity') "
                 "ON CONFLICT (id) DO NOTHING")
    row = conn.execute("UPDATE guardrails.watcher_state SET last_ping_at = now() WHERE id = 1 "
                       "AND last_ping_at <= now() - make_interval(secs => %s) RETURNING id",
                       (interval_seconds,)).fetchone()
    return row is not None


def watcher_status(conn: psycopg.Connection[Any], status: str) -> None:
    conn.execute("UPDATE guardrails.watcher_state SET last_status = %s WHERE id = 1", (status[:200],))
