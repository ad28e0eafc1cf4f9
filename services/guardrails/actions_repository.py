"""SQL for actions, approvals, escalations and the n8n outbox: one function per query, no commits."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Sequence, cast

import psycopg
from psycopg.types.json import Jsonb

Row = dict[str, Any]
_COLUMNS = ("id, run_id, task, caller, connector, operation, target, payload, reason, idempotency_key, fingerprint, "
            "rule, mode, policy_reason, status, expires_at, decision, approver, decision_channel, decision_comment, "
            "decided_at, attempts, lease_until, executed_at, result, last_error, error_retryable, outcome_unknown, "
            "created_at, updated_at")

# ------------------------------------------------------------------ actions


def action_insert(conn: psycopg.Connection[Any], *, action_id: uuid.UUID, run_id: uuid.UUID, task: str, caller: str,
                  connector: str, operation: str, target: str, payload: dict[str, Any], reason: str,
                  idempotency_key: str, fingerprint: str, rule: str, mode: str, policy_reason: str, status: str,
                  expires_seconds: int | None) -> Row | None:
    """Insert unless (caller, idempotency_key) exists; None means a copy won (it may still be committing)."""
    return conn.execute(
        f"INSERT INTO guardrails.actions (id, run_id, task, caller, connector, operation, target, payload, reason, "
        "idempotency_key, fingerprint, rule, mode, policy_reason, status, expires_at, decided_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
        "CASE WHEN %s::int IS NULL THEN NULL ELSE now() + make_interval(secs => %s::int) END, "
        "CASE WHEN %s = 'approved' THEN now() END) "
        f"ON CONFLICT (caller, idempotency_key) DO NOTHING RETURNING {_COLUMNS}",
        (action_id, run_id, task, caller, connector, operation, target, Jsonb(payload), reason, idempotency_key,
         fingerprint, rule, mode, policy_reason, status, expires_seconds, expires_seconds, status)).fetchone()


def action_by_key(conn: psycopg.Connection[Any], caller: str, idempotency_key: str) -> Row | None:
    return conn.execute(f"SELECT {_COLUMNS} FROM guardrails.actions WHERE caller = %s AND idempotency_key = %s",
                        (caller, idempotency_key)).fetchone()


def action_get(conn: psycopg.Connection[Any], action_id: uuid.UUID | str, *, for_update: bool = False) -> Row | None:
    q = f"SELECT {_COLUMNS} FROM guardrails.actions WHERE id = %s"
    return conn.execute(q + (" FOR UPDATE" if for_update else ""), (action_id,)).fetchone()


def action_list(conn: psycopg.Connection[Any], *, status: Sequence[str] | None, connector: str | None,
                operation: str | None, target: str | None, run_id: str | None, task: str | None, rule: str | None,
                since: datetime | None, limit: int) -> list[Row]:
    where: list[str] = ["TRUE"]
    args: list[Any] = []
    if status:
        where.append("status = ANY(%s)")
        args.append(list(status))
    for col, val in (("connector", connector), ("operation", operation), ("target", target), ("run_id", run_id),
                     ("task", task), ("rule", rule)):
        if val:
            where.append(f"{col} = %s")
            args.append(val)
    if since:
        where.append("created_at >= %s")
        args.append(since)
    args.append(limit)
    return conn.execute(f"SELECT {_COLUMNS} FROM guardrails.actions WHERE {' AND '.join(where)} "
                        "ORDER BY created_at DESC, id LIMIT %s", args).fetchall()


def action_decide(conn: psycopg.Connection[Any], action_id: uuid.UUID, *, decision: str, approver: str, channel: str,
                  comment: str | None) -> Row:
    status = "approved" if decision == "approve" else "rejected"
    row = conn.execute(
        "UPDATE guardrails.actions SET status = %s, decision = %s, approver = %s, decision_channel = %s, "
        f"decision_comment = %s, decided_at = now(), updated_at = now() WHERE id = %s RETURNING {_COLUMNS}",
        (status, decision, approver, channel, comment, action_id)).fetchone()
    assert row is not None
    return cast(Row, row)


def action_expire(conn: psycopg.Connection[Any], action_id: uuid.UUID) -> Row | None:
    """pending_approval -> expired; None if it was no longer pending."""
    return conn.execute("UPDATE guardrails.actions SET status = 'expired', updated_at = now() "
                        f"WHERE id = %s AND status = 'pending_approval' RETURNING {_COLUMNS}", (action_id,)).fetchone()


def actions_overdue(conn: psycopg.Connection[Any], *, limit: int) -> list[Row]:
    """Pending actions past their deadline, locked (skipping ones another worker is handling)."""
    return conn.execute(f"SELECT {_COLUMNS} FROM guardrails.actions WHERE status = 'pending_approval' "
                        "AND expires_at <= now() ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
                        (limit,)).fetchall()


def action_claim(conn: psycopg.Connection[Any], action_id: uuid.UUID, *, lease_seconds: int) -> Row | None:
    """approved -> executing with a new attempt number and a lease; None if someone else claimed it first."""
    return conn.execute(
        "UPDATE guardrails.actions SET status = 'executing', attempts = attempts + 1, "
        "lease_until = now() + make_interval(secs => %s), updated_at = now() "
        f"WHERE id = %s AND status = 'approved' RETURNING {_COLUMNS}", (lease_seconds, action_id)).fetchone()


def action_reclaim(conn: psycopg.Connection[Any], action_id: uuid.UUID, *, lease_seconds: int) -> Row | None:
    """Take over an execution whose lease ran out (its worker crashed): a new attempt, a new lease."""
    return conn.execute(
        "UPDATE guardrails.actions SET attempts = attempts + 1, lease_until = now() + make_interval(secs => %s), "
        f"updated_at = now() WHERE id = %s AND status = 'executing' AND lease_until < now() RETURNING {_COLUMNS}",
        (lease_seconds, action_id)).fetchone()


def actions_abandoned(conn: psycopg.Connection[Any], *, limit: int) -> list[Row]:
    return conn.execute("SELECT id FROM guardrails.actions WHERE status = 'executing' AND lease_until < now() "
                        "ORDER BY lease_until LIMIT %s", (limit,)).fetchall()


def actions_approved(conn: psycopg.Connection[Any], *, limit: int) -> list[Row]:
    return conn.execute("SELECT id FROM guardrails.actions WHERE status = 'approved' ORDER BY decided_at NULLS FIRST "
                        "LIMIT %s", (limit,)).fetchall()


def action_finish(conn: psycopg.Connection[Any], action_id: uuid.UUID, *, attempt: int, status: str,
                  result: dict[str, Any] | None, error: str | None, retryable: bool | None,
                  outcome_unknown: bool) -> Row | None:
    """executing -> executed / failed, only by the holder of this attempt (a stale worker cannot overwrite)."""
    return conn.execute(
        "UPDATE guardrails.actions SET status = %s, result = coalesce(%s, result), last_error = %s, "
        "error_retryable = %s, outcome_unknown = %s, lease_until = NULL, updated_at = now(), "
        "executed_at = CASE WHEN %s = 'executed' THEN now() ELSE executed_at END "
        f"WHERE id = %s AND status = 'executing' AND attempts = %s RETURNING {_COLUMNS}",
        (status, Jsonb(result) if result is not None else None, error, retryable, outcome_unknown, status,
         action_id, attempt)).fetchone()


def action_requeue(conn: psycopg.Connection[Any], action_id: uuid.UUID) -> Row | None:
    """failed -> approved (an operator's retry)."""
    return conn.execute("UPDATE guardrails.actions SET status = 'approved', updated_at = now() "
                        f"WHERE id = %s AND status = 'failed' RETURNING {_COLUMNS}", (action_id,)).fetchone()


def attempt_start(conn: psycopg.Connection[Any], action_id: uuid.UUID, attempt: int, actor: str) -> None:
    conn.execute("INSERT INTO guardrails.action_attempts (action_id, attempt, actor) VALUES (%s, %s, %s) "
                 "ON CONFLICT DO NOTHING", (action_id, attempt, actor))


def attempt_finish(conn: psycopg.Connection[Any], action_id: uuid.UUID, attempt: int, *, outcome: str,
                   error: str | None = None, result: dict[str, Any] | None = None) -> None:
    conn.execute("UPDATE guardrails.action_attempts SET finished_at = now(), outcome = %s, error = %s, result = %s "
                 "WHERE action_id = %s AND attempt = %s",
                 (outcome, error, Jsonb(result) if result is not None else None, action_id, attempt))


def attempts_of(conn: psycopg.Connection[Any], action_id: uuid.UUID | str) -> list[Row]:
    return conn.execute("SELECT attempt, actor, started_at, finished_at, outcome, error, result "
                        "FROM guardrails.action_attempts WHERE action_id = %s ORDER BY attempt",
                        (action_id,)).fetchall()


def approval_request_add(conn: psycopg.Connection[Any], action_id: uuid.UUID, *, execution_id: str,
                         channels: Sequence[str]) -> bool:
    row = conn.execute("INSERT INTO guardrails.approval_requests (action_id, execution_id, channels) "
                       "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING action_id",
                       (action_id, execution_id, list(channels))).fetchone()
    return row is not None


def approval_requests_of(conn: psycopg.Connection[Any], action_id: uuid.UUID | str) -> list[Row]:
    return conn.execute("SELECT execution_id, channels, requested_at FROM guardrails.approval_requests "
                        "WHERE action_id = %s ORDER BY requested_at", (action_id,)).fetchall()


# ------------------------------------------------------------------ escalations

_ESC_COLUMNS = ("id, run_id, task, caller, subject, reason, context, status, resolution, resolved_by, comment, "
                "created_at, resolved_at")


def escalation_insert(conn: psycopg.Connection[Any], *, escalation_id: uuid.UUID, run_id: uuid.UUID, task: str,
                      caller: str, subject: str, reason: str, context: dict[str, Any]) -> Row | None:
    return conn.execute(
        "INSERT INTO guardrails.escalations (id, run_id, task, caller, subject, reason, context) "
        f"VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (run_id, subject) DO NOTHING RETURNING {_ESC_COLUMNS}",
        (escalation_id, run_id, task, caller, subject, reason, Jsonb(context))).fetchone()


def escalation_by_subject(conn: psycopg.Connection[Any], run_id: uuid.UUID, subject: str) -> Row | None:
    return conn.execute(f"SELECT {_ESC_COLUMNS} FROM guardrails.escalations WHERE run_id = %s AND subject = %s",
                        (run_id, subject)).fetchone()


def escalation_get(conn: psycopg.Connection[Any], escalation_id: uuid.UUID, *, for_update: bool = False) -> Row | None:
    q = f"SELECT {_ESC_COLUMNS} FROM guardrails.escalations WHERE id = %s"
    return conn.execute(q + (" FOR UPDATE" if for_update else ""), (escalation_id,)).fetchone()


def escalation_resolve(conn: psycopg.Connection[Any], escalation_id: uuid.UUID, *, resolution: str, actor: str,
                       comment: str | None) -> Row:
    row = conn.execute("UPDATE guardrails.escalations SET status = 'resolved', resolution = %s, resolved_by = %s, "
                       f"comment = %s, resolved_at = now() WHERE id = %s RETURNING {_ESC_COLUMNS}",
                       (resolution, actor, comment, escalation_id)).fetchone()
    assert row is not None
    return cast(Row, row)


def escalation_list(conn: psycopg.Connection[Any], *, status: str | None, task: str | None, subject: str | None,
                    run_id: str | None, since: datetime | None, limit: int) -> list[Row]:
    where: list[str] = ["TRUE"]
    args: list[Any] = []
    for col, val in (("status", status), ("task", task), ("subject", subject), ("run_id", run_id)):
        if val:
            where.append(f"{col} = %s")
            args.append(val)
    if since:
        where.append("created_at >= %s")
        args.append(since)
    args.append(limit)
    return conn.execute(f"SELECT {_ESC_COLUMNS} FROM guardrails.escalations WHERE {' AND '.join(where)} "
                        "ORDER BY created_at DESC, id LIMIT %s", args).fetchall()


# ------------------------------------------------------------------ outbox to n8n


def outbox_enqueue(conn: psycopg.Connection[Any], *, dedupe_key: str, kind: str, payload: dict[str, Any]) -> bool:
    row = conn.execute("INSERT INTO guardrails.notify_outbox (dedupe_key, kind, payload) VALUES (%s, %s, %s) "
                       "ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
                       (dedupe_key, kind, Jsonb(payload))).fetchone()
    return row is not None


def outbox_due(conn: psycopg.Connection[Any], *, kinds: Sequence[str], limit: int) -> list[Row]:
    """Undelivered rows of these kinds whose time has come, locked so no other worker sends them concurrently."""
    return conn.execute("SELECT * FROM guardrails.notify_outbox WHERE delivered_at IS NULL AND kind = ANY(%s) "
                        "AND next_attempt_at <= now() ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                        (list(kinds), limit)).fetchall()


def outbox_delivered(conn: psycopg.Connection[Any], row_id: int, *, note: str | None = None) -> None:
    conn.execute("UPDATE guardrails.notify_outbox SET delivered_at = now(), attempts = attempts + 1, last_error = %s "
                 "WHERE id = %s", (note, row_id))


def outbox_failed(conn: psycopg.Connection[Any], row_id: int, *, error: str, retry_in_seconds: float) -> None:
    conn.execute("UPDATE guardrails.notify_outbox SET attempts = attempts + 1, last_error = %s, "
                 "next_attempt_at = now() + make_interval(secs => %s) WHERE id = %s",
                 (error[:500], retry_in_seconds, row_id))


def outbox_list(conn: psycopg.Connection[Any], *, pending_only: bool, limit: int) -> list[Row]:
    q = "SELECT * FROM guardrails.notify_outbox"
    if pending_only:
        q += " WHERE delivered_at IS NULL"
    return conn.execute(q + " ORDER BY id DESC LIMIT %s", (limit,)).fetchall()
