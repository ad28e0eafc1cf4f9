"""SQL of the triage service: one function per query; callers own the transaction."""
from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb


def get_result(conn: psycopg.Connection[Any], *, run_id: str, ticket_key: str,
               lock: bool = False) -> dict[str, Any] | None:
    """The stored response (and submission, None until submitted) of a triage done for this run and ticket."""
    row = conn.execute("SELECT response, submission FROM triage.results WHERE run_id = %s AND ticket_key = %s"
                       + (" FOR UPDATE" if lock else ""), (run_id, ticket_key)).fetchone()
    return dict(row) if row else None


def set_submission(conn: psycopg.Connection[Any], *, run_id: str, ticket_key: str,
                   submission: dict[str, Any]) -> None:
    """Record what guardrails answered for the proposals or the escalation."""
    conn.execute("UPDATE triage.results SET submission = %s WHERE run_id = %s AND ticket_key = %s",
                 (Jsonb(submission), run_id, ticket_key))


def insert_result(conn: psycopg.Connection[Any], *, run_id: str, ticket_key: str, mode: str, needs_human: bool,
                  confidence: float, cost_usd: float, response: dict[str, Any]) -> bool:
    """Store a triage response; False when one already exists for the run and ticket (a concurrent twin)."""
    cur = conn.execute(
        "INSERT INTO triage.results (run_id, ticket_key, mode, needs_human, confidence, cost_usd, response) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (run_id, ticket_key) DO NOTHING",
        (run_id, ticket_key, mode, needs_human, confidence, cost_usd, Jsonb(response)))
    return cur.rowcount == 1


def record_intake(conn: psycopg.Connection[Any], *, source: str, outcome: str, delivery_id: str | None = None,
                  event: str | None = None, issue_key: str | None = None, issue_id: str | None = None,
                  reason: str | None = None, detail: str | None = None) -> int:
    """Append one intake record (accepted, duplicate, rejected or refused) and return its id."""
    row = conn.execute(
        "INSERT INTO triage.intake (source, delivery_id, event, issue_key, issue_id, outcome, reason, detail) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (source, delivery_id, event, issue_key, issue_id, outcome, reason, detail)).fetchone()
    return int(row["id"])  # type: ignore[index]


def claim_ticket(conn: psycopg.Connection[Any], *, issue_key: str, issue_id: str | None, source: str,
                 delivery_id: str | None, lease_seconds: int) -> bool:
    """Claim a ticket for triage; True if this caller won. A completed claim is never taken again, an
    abandoned one (older than the lease, never completed) is."""
    row = conn.execute(
        """
        INSERT INTO triage.claims (issue_key, issue_id, source, delivery_id) VALUES (%s, %s, %s, %s)
        ON CONFLICT (issue_key) DO UPDATE
           SET claimed_at = now(), attempts = claims.attempts + 1, source = EXCLUDED.source,
               delivery_id = EXCLUDED.delivery_id
         WHERE claims.completed_at IS NULL
           AND claims.claimed_at < now() - make_interval(secs => %s)
        RETURNING issue_key
        """, (issue_key, issue_id, source, delivery_id, lease_seconds)).fetchone()
    return row is not None


def complete_claim(conn: psycopg.Connection[Any], *, issue_key: str, run_id: str) -> None:
    """Mark a ticket's claim done (no-op for tickets triaged without a claim, e.g. manual calls)."""
    conn.execute("UPDATE triage.claims SET completed_at = coalesce(completed_at, now()), run_id = coalesce(run_id, %s) "
                 "WHERE issue_key = %s", (run_id, issue_key))


def release_claim(conn: psycopg.Connection[Any], *, issue_key: str) -> bool:
    """Give up a claim that was never completed (its run was refused): the next delivery or poll may take it."""
    cur = conn.execute("DELETE FROM triage.claims WHERE issue_key = %s AND completed_at IS NULL", (issue_key,))
    return cur.rowcount == 1


def list_intake(conn: psycopg.Connection[Any], *, outcome: str | None, limit: int) -> list[dict[str, Any]]:
    """Recent intake records, newest first."""
    rows = conn.execute(
        "SELECT id, source, delivery_id, event, issue_key, issue_id, outcome, reason, detail, received_at "
        "FROM triage.intake "
        "WHERE (%s::text IS NULL OR outcome = %s) ORDER BY id DESC LIMIT %s", (outcome, outcome, limit)).fetchall()
    return [dict(r) for r in rows]


def count_results(conn: psycopg.Connection[Any]) -> int:
    """How many triages are stored."""
    row = conn.execute("SELECT count(*) AS n FROM triage.results").fetchone()
    return int(row["n"])  # type: ignore[index]
