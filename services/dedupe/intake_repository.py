"""SQL of the duplicate flow's intake (deliveries and claims), one function per query; callers own the transaction."""
from __future__ import annotations

from typing import Any

import psycopg


def record_intake(conn: psycopg.Connection[Any], *, outcome: str, delivery_id: str | None = None,
                  event: str | None = None, issue_key: str | None = None, issue_id: str | None = None,
                  reason: str | None = None, detail: str | None = None) -> int:
    """Append one delivery record and return its id."""
    row = conn.execute(
        "INSERT INTO dedupe.intake (delivery_id, event, issue_key, issue_id, outcome, reason, detail) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (delivery_id, event, issue_key, issue_id, outcome, reason, detail)).fetchone()
    return int(row["id"])  # type: ignore[index]


def claim_issue(conn: psycopg.Connection[Any], *, issue_key: str, issue_id: str | None, delivery_id: str | None,
                lease_seconds: int) -> bool:
    """Claim an issue for its duplicate check; True if this caller won (new, or an abandoned claim past its lease)."""
    row = conn.execute(
        """
        INSERT INTO dedupe.claims (issue_key, issue_id, delivery_id) VALUES (%s, %s, %s)
        ON CONFLICT (issue_key) DO UPDATE
           SET claimed_at = now(), attempts = claims.attempts + 1, delivery_id = EXCLUDED.delivery_id
         WHERE claims.completed_at IS NULL
           AND claims.claimed_at < now() - make_interval(secs => %s)
        RETURNING issue_key
        """, (issue_key, issue_id, delivery_id, lease_seconds)).fetchone()
    return row is not None


def complete_claim(conn: psycopg.Connection[Any], *, issue_key: str, run_id: str, verdict: str) -> None:
    """The check ran and its proposals were built: the issue is never claimed again."""
    conn.execute("UPDATE dedupe.claims SET completed_at = coalesce(completed_at, now()), run_id = %s, verdict = %s "
                 "WHERE issue_key = %s", (run_id, verdict, issue_key))


def release_claim(conn: psycopg.Connection[Any], *, issue_key: str) -> bool:
    """Give up a claim never completed (guardrails refused its run): a later delivery may take it."""
    cur = conn.execute("DELETE FROM dedupe.claims WHERE issue_key = %s AND completed_at IS NULL", (issue_key,))
    return cur.rowcount == 1


def stored_check(conn: psycopg.Connection[Any], idempotency_key: str) -> tuple[str | None, dict[str, Any]] | None:
    """The ticket key and answer of the duplicate check stored under an idempotency key."""
    row = conn.execute("SELECT ticket_key, response FROM dedupe.duplicate_checks WHERE idempotency_key = %s",
                       (idempotency_key,)).fetchone()
    return (row["ticket_key"], row["response"]) if row else None


def list_intake(conn: psycopg.Connection[Any], *, outcome: str | None, issue_key: str | None,
                limit: int) -> list[dict[str, Any]]:
    """Recent delivery records, newest first."""
    rows = conn.execute(
        "SELECT id, delivery_id, event, issue_key, issue_id, outcome, reason, detail, received_at FROM dedupe.intake "
        "WHERE (%s::text IS NULL OR outcome = %s) AND (%s::text IS NULL OR issue_key = %s) "
        "ORDER BY id DESC LIMIT %s", (outcome, outcome, issue_key, issue_key, limit)).fetchall()
    return [dict(r) for r in rows]
