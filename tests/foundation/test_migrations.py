"""Migrations: one schema per service, idempotent, refuse edited history, safe when run concurrently."""
from __future__ import annotations

import threading

import psycopg
import pytest

from shared import db


def test_every_service_has_its_own_schema(database_url):
    with psycopg.connect(database_url) as conn:
        schemas = {r[0] for r in conn.execute("SELECT schema_name FROM information_schema.schemata")}
    assert {"guardrails", "triage", "dedupe", "digest", "watch"} <= schemas


def test_second_run_applies_nothing(database_url):
    assert db.migrate(database_url, "watch") == []


def test_concurrent_runs_apply_each_migration_once(database_url, tmp_path):
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE t_conc (id int PRIMARY KEY);")
    (tmp_path / "0002_b.sql").write_text("INSERT INTO t_conc VALUES (1);")
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(db.migrate(database_url, "migtest_conc", tmp_path))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(map(len, results)) == [0, 0, 0, 2]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM migtest_conc.t_conc").fetchone()[0] == 1


def test_edited_migration_is_refused(database_url, tmp_path):
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE t1 (id int);")
    db.migrate(database_url, "migtest_edit", tmp_path)
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE t1 (id bigint);")
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        db.migrate(database_url, "migtest_edit", tmp_path)


def test_failed_migration_leaves_nothing_half_applied(database_url, tmp_path):
    (tmp_path / "0001_bad.sql").write_text("CREATE TABLE t_ok (id int); SELECT no_such_function();")
    with pytest.raises(psycopg.Error):
        db.migrate(database_url, "migtest_bad", tmp_path)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('migtest_bad.t_ok')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM migtest_bad.schema_migrations").fetchone()[0] == 0
