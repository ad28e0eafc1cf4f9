"""SQL for the digest archive, health history and embedding cache — one function per query."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Iterable, Sequence

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

DIGEST_COLUMNS = ("id, kind, run_id, created_at, as_of, params, summary, data, narrative, narrative_mode, "
                  "narrative_reason, narrative_model, slack, email_subject, email_html, email_text, markdown")
SUMMARY_COLUMNS = "id, kind, run_id, created_at, as_of, summary, narrative_mode, narrative_reason, email_subject"


def insert_digest(conn: psycopg.Connection[Any], *, digest: dict[str, Any]) -> dict[str, Any]:
    """Archive a complete digest; returns the stored row."""
    row = conn.execute(
        f"INSERT INTO digest.digests ({DIGEST_COLUMNS}) VALUES "
        "(%(id)s, %(kind)s, %(run_id)s, now(), %(as_of)s, %(params)s, %(summary)s, %(data)s, %(narrative)s, "
        "%(narrative_mode)s, %(narrative_reason)s, %(narrative_model)s, %(slack)s, %(email_subject)s, "
        "%(email_html)s, %(email_text)s, %(markdown)s) "
        f"RETURNING {DIGEST_COLUMNS}",
        {**digest, "id": digest.get("id") or uuid.uuid4(), "params": Jsonb(digest["params"]),
         "summary": Jsonb(digest["summary"]), "data": Jsonb(digest["data"]), "slack": Jsonb(digest["slack"])},
    ).fetchone()
    assert row is not None
    return dict(row)


def get_digest(conn: psycopg.Connection[Any], *, digest_id: uuid.UUID) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {DIGEST_COLUMNS} FROM digest.digests WHERE id = %s", (digest_id,)).fetchone()
    return dict(row) if row else None


def get_digest_by_run(conn: psycopg.Connection[Any], *, kind: str, run_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {DIGEST_COLUMNS} FROM digest.digests WHERE kind = %s AND run_id = %s",
                       (kind, run_id)).fetchone()
    return dict(row) if row else None


def list_digests(conn: psycopg.Connection[Any], *, kind: str | None, limit: int,
                 before: datetime | None = None) -> list[dict[str, Any]]:
    """Newest first, optionally of one kind and created before a time (for paging)."""
    rows = conn.execute(
        f"SELECT {SUMMARY_COLUMNS} FROM digest.digests "
        "WHERE (%(kind)s::text IS NULL OR kind = %(kind)s) AND (%(before)s::timestamptz IS NULL OR created_at < %(before)s) "
        "ORDER BY created_at DESC, id LIMIT %(limit)s",
        {"kind": kind, "before": before, "limit": limit}).fetchall()
    return [dict(r) for r in rows]


def insert_health_scores(conn: psycopg.Connection[Any], *, digest_id: uuid.UUID, as_of: datetime,
                         rows: Iterable[dict[str, Any]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO digest.health_scores (digest_id, client, name, as_of, score, components) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            [(digest_id, r["client"], r["name"], as_of, r["score"], Jsonb(r["components"])) for r in rows])


def previous_health(conn: psycopg.Connection[Any], *, before: datetime,
                    clients: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Each client's latest score strictly before `before` (what today's score is compared with)."""
    rows = conn.execute(
        "SELECT DISTINCT ON (client) client, score, as_of FROM digest.health_scores "
        "WHERE as_of < %(before)s AND (%(clients)s::text[] IS NULL OR client = ANY(%(clients)s)) "
        "ORDER BY client, as_of DESC", {"before": before, "clients": list(clients) if clients else None}).fetchall()
    return {r["client"]: {"score": float(r["score"]), "as_of": r["as_of"]} for r in rows}


def latest_health(conn: psycopg.Connection[Any], *, client: str | None = None) -> list[dict[str, Any]]:
    """The most recent score of every client (or one client)."""
    rows = conn.execute(
        "SELECT DISTINCT ON (client) client, name, score, as_of, components, digest_id FROM digest.health_scores "
        "WHERE (%(client)s::text IS NULL OR client = %(client)s) ORDER BY client, as_of DESC",
        {"client": client}).fetchall()
    return [dict(r) for r in rows]


def health_history(conn: psycopg.Connection[Any], *, client: str, limit: int) -> list[dict[str, Any]]:
    """A client's scores, newest first."""
    rows = conn.execute(
        "SELECT as_of, score, digest_id FROM digest.health_scores WHERE client = %s "
        "ORDER BY as_of DESC LIMIT %s", (client, limit)).fetchall()
    return [dict(r) for r in rows]


def cached_embeddings(conn: psycopg.Connection[Any], *, model: str,
                      keys: Sequence[str]) -> dict[str, tuple[bytes, np.ndarray]]:
    """key → (content hash, vector) for the keys already embedded with this model."""
    out: dict[str, tuple[bytes, np.ndarray]] = {}
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT key, content_hash, vector FROM digest.embeddings WHERE model = %s AND key = ANY(%s)",
                    (model, list(keys)))
        for r in cur:
            out[r["key"]] = (bytes(r["content_hash"]), np.frombuffer(r["vector"], dtype=np.float32))
    return out


def store_embeddings(conn: psycopg.Connection[Any], *, model: str,
                     rows: Sequence[tuple[str, bytes, np.ndarray]]) -> None:
    """Upsert (key, content hash, vector) rows."""
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO digest.embeddings (model, key, content_hash, vector) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (model, key) DO UPDATE SET content_hash = EXCLUDED.content_hash, "
            "vector = EXCLUDED.vector, updated_at = now()",
            [(model, k, h, np.asarray(v, dtype=np.float32).tobytes()) for k, h, v in rows])
