"""PostgreSQL pool and migrations: one schema per service, applied idempotently."""
from __future__ import annotations

import hashlib
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def make_pool(database_url: str, *, min_size: int = 1, max_size: int = 10, name: str = "metis") -> ConnectionPool:
    """A connection pool whose connections return dict rows; opened lazily, checked on borrow."""
    return ConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "autocommit": False},
        open=False,
        name=name,
        timeout=5.0,
        check=ConnectionPool.check_connection,
    )


@contextmanager
def transaction(pool: ConnectionPool) -> Iterator[psycopg.Connection]:
    """Borrow a connection; commit once at the end of the unit of work, roll back on error."""
    with pool.connection() as conn:
        with conn.transaction():
            yield conn


def migrations_dir(service: str) -> Path:
    return ROOT / "services" / service / "migrations"


def migrate(database_url: str, service: str, directory: Path | None = None) -> list[str]:
    """Apply the service's pending migrations in order inside its own schema; return what ran.

    Safe to call from many processes at once (an advisory lock serialises them) and idempotent.
    A migration whose file changed after it was applied is an error, never silently re-run.
    """
    directory = directory or migrations_dir(service)
    files = sorted(p for p in directory.glob("*.sql") if _MIGRATION_NAME.match(p.name))
    applied: list[str] = []
    lock_key = int.from_bytes(hashlib.sha256(f"metis-migrate-{service}".encode()).digest()[:8], "big", signed=True)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (lock_key,))
        try:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(service)))
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                " version text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())").format(sql.Identifier(service)))
            rows = conn.execute(sql.SQL("SELECT version, checksum FROM {}.schema_migrations").format(
                sql.Identifier(service))).fetchall()
            done = {r[0]: r[1] for r in rows}
            for path in files:
                text = path.read_text()
                checksum = hashlib.sha256(text.encode()).hexdigest()
                version = path.stem
                if version in done:
                    if done[version] != checksum:
                        raise RuntimeError(f"migration {service}/{path.name} changed after it was applied; "
                                           "add a new migration instead of editing an applied one")
                    continue
                with conn.transaction():
                    conn.execute(sql.SQL("SET LOCAL search_path TO {}, public").format(sql.Identifier(service)))
                    conn.execute(text.encode())
                    conn.execute(sql.SQL("INSERT INTO {}.schema_migrations (version, checksum) VALUES (%s, %s)")
                                 .format(sql.Identifier(service)), (version, checksum))
                applied.append(version)
                log.info("applied migration", extra={"schema": service, "version": version})
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key,))
    return applied


def ping(pool: ConnectionPool) -> None:
    with pool.connection(timeout=2.0) as conn:
        conn.execute("SELECT 1")
