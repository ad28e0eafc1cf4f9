"""SQL for the dedupe schema, one function per query; callers own the transaction."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import psycopg
from psycopg.types.json import Jsonb

TICKET_COLUMNS = ("key", "project", "summary", "description", "status", "resolution", "resolution_text",
                  "priority", "components", "labels", "client", "created", "updated", "content_hash",
                  "row_hash", "embedder", "embedding", "lex_summary", "lex_description")
# What a worker needs in memory (the description stays in PostgreSQL).
INDEX_COLUMNS = ("key", "project", "summary", "status", "resolution", "resolution_text", "priority",
                 "components", "labels", "client", "created", "embedder", "embedding", "lex_summary",
                 "lex_description", "rev", "deleted")


def index_state(conn: psycopg.Connection) -> dict[str, Any] | None:
    """The change counter and epoch, or None when the state row does not exist (empty or truncated index)."""
    return conn.execute("SELECT rev, epoch::text AS epoch FROM dedupe.index_state WHERE id = 1").fetchone()  # type: ignore[return-value]


def take_revs(conn: psycopg.Connection, n: int) -> int:
    """Reserve n revs and lock the counter until commit (writers serialise, revs commit in order); return the last."""
    row = conn.execute(
        "INSERT INTO dedupe.index_state AS s (id, rev) VALUES (1, %s) "
        "ON CONFLICT (id) DO UPDATE SET rev = s.rev + EXCLUDED.rev RETURNING rev", (n,)).fetchone()
    assert row is not None
    return int(row["rev"])  # type: ignore[call-overload]


def existing_hashes(conn: psycopg.Connection, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """key -> {content_hash, row_hash, embedder, deleted, embedding} for the keys that exist."""
    rows = conn.execute(
        "SELECT key, content_hash, row_hash, embedder, deleted, embedding FROM dedupe.tickets WHERE key = ANY(%s)",
        (list(keys),)).fetchall()
    return {r["key"]: r for r in rows}  # type: ignore[call-overload,index,misc]


_UPSERT = (
    f"INSERT INTO dedupe.tickets ({', '.join(TICKET_COLUMNS)}, rev, deleted, indexed_at) "
    f"VALUES ({', '.join(f'%({c})s' for c in TICKET_COLUMNS)}, %(rev)s, false, now()) "
    f"ON CONFLICT (key) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in TICKET_COLUMNS if c != 'key')}, "
    "rev = EXCLUDED.rev, deleted = false, indexed_at = now()")


def upsert_ticket(conn: psycopg.Connection, values: dict[str, Any], rev: int) -> None:
    """Insert or replace one ticket (and undelete it)."""
    conn.execute(_UPSERT, {**values, "rev": rev})


def upsert_tickets(conn: psycopg.Connection, rows: Sequence[dict[str, Any]], first_rev: int) -> None:
    """Insert or replace tickets with consecutive revs from `first_rev`, in one pipelined round of statements."""
    with conn.cursor() as cur:
        cur.executemany(_UPSERT, [{**values, "rev": first_rev + i} for i, values in enumerate(rows)])


def mark_deleted(conn: psycopg.Connection, key: str, rev: int) -> bool:
    """Tombstone a ticket (workers see the tombstone through its rev); False if it was not there."""
    cur = conn.execute("UPDATE dedupe.tickets SET deleted = true, rev = %s, indexed_at = now() "
                       "WHERE key = %s AND NOT deleted", (rev, key))
    return cur.rowcount == 1


def ticket_exists(conn: psycopg.Connection, key: str) -> bool:
    return conn.execute("SELECT 1 FROM dedupe.tickets WHERE key = %s AND NOT deleted", (key,)).fetchone() is not None


def changes_since(conn: psycopg.Connection, rev: int, *, up_to: int, page: int = 5000) -> Iterator[list[dict[str, Any]]]:
    """Rows changed after `rev` (tombstones included) up to `up_to`, in rev order, a page at a time."""
    cols = ", ".join(INDEX_COLUMNS)
    last = rev
    while True:
        rows = conn.execute(f"SELECT {cols} FROM dedupe.tickets WHERE rev > %s AND rev <= %s ORDER BY rev LIMIT %s",
                            (last, up_to, page)).fetchall()
        if not rows:
            return
        yield rows  # type: ignore[misc]
        last = int(rows[-1]["rev"])  # type: ignore[call-overload]


def get_check(conn: psycopg.Connection, idempotency_key: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT response FROM dedupe.duplicate_checks WHERE idempotency_key = %s",
                       (idempotency_key,)).fetchone()
    return row["response"] if row else None  # type: ignore[call-overload,no-any-return]


def save_check(conn: psycopg.Connection, idempotency_key: str, ticket_key: str | None,
               response: dict[str, Any]) -> dict[str, Any]:
    """Record a check's answer; if a concurrent copy got there first, return the stored one."""
    row = conn.execute(
        "INSERT INTO dedupe.duplicate_checks (idempotency_key, ticket_key, response) VALUES (%s, %s, %s) "
        "ON CONFLICT (idempotency_key) DO NOTHING RETURNING response",
        (idempotency_key, ticket_key, Jsonb(response))).fetchone()
    if row is not None:
        return response
    stored = get_check(conn, idempotency_key)
    return stored if stored is not None else response


def get_cursor(conn: psycopg.Connection, name: str) -> dict[str, Any] | None:
    return conn.execute("SELECT name, jql, next_page_token, done, tickets FROM dedupe.backfill_cursors "
                        "WHERE name = %s", (name,)).fetchone()  # type: ignore[return-value]


def save_cursor(conn: psycopg.Connection, *, name: str, jql: str, next_page_token: str | None, done: bool,
                added: int) -> None:
    conn.execute(
        "INSERT INTO dedupe.backfill_cursors AS c (name, jql, next_page_token, done, tickets) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET jql = EXCLUDED.jql, "
        "next_page_token = EXCLUDED.next_page_token, done = EXCLUDED.done, tickets = c.tickets + EXCLUDED.tickets, "
        "updated_at = now()", (name, jql, next_page_token, done, added))


def reset_cursor(conn: psycopg.Connection, name: str) -> None:
    conn.execute("DELETE FROM dedupe.backfill_cursors WHERE name = %s", (name,))
