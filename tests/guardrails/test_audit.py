"""The audit log: append-only, hash-chained, verify finds the first broken link even after superuser edits."""
from __future__ import annotations

import json

import psycopg
import pytest
import requests
from click.testing import CliRunner

from services.guardrails import cli, repository as repo, service
from tests.conftest import auth


def _fill(guardrails, n_runs: int = 3) -> list[str]:
    c = guardrails.client("triage")
    ids = []
    for i in range(n_runs):
        run = c.open_run("triage", trigger="event", external_id=f"e{i}")
        c.finish_run(run.id, "succeeded", {"n": i})
        ids.append(run.id)
    return ids


def test_chain_verifies_and_updates_and_deletes_are_refused(guardrails, sql):
    _fill(guardrails)
    with guardrails.pool.connection() as conn:
        result = service.verify_audit(conn)
    assert result.ok and result.checked >= 7  # policy.changed + 3 x (opened, finished)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        sql.execute("UPDATE guardrails.audit_log SET actor = 'mallory' WHERE seq = 2")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        sql.execute("DELETE FROM guardrails.audit_log WHERE seq = 2")


def _tamper(sql, statement: str, *args) -> None:
    """A superuser bypassing the append-only trigger."""
    with sql.transaction():
        sql.execute("SET LOCAL session_replication_role = replica")
        sql.execute(statement, args)


def test_verify_catches_an_edited_row(guardrails, sql, database_url):
    _fill(guardrails)
    _tamper(sql, "UPDATE guardrails.audit_log SET data = jsonb_set(data, '{outcome,n}', '99') "
                 "WHERE seq = (SELECT min(seq) FROM guardrails.audit_log WHERE kind = 'run.finished')")
    bad = sql.execute("SELECT min(seq) AS s FROM guardrails.audit_log WHERE kind = 'run.finished'").fetchone()["s"]
    with guardrails.pool.connection() as conn:
        result = service.verify_audit(conn)
    assert not result.ok and result.first_broken_seq == bad and "altered" in result.problem
    res = CliRunner().invoke(cli.audit, ["verify", "--database-url", database_url])
    assert res.exit_code == 1 and f"BROKEN at entry {bad}" in res.output
    r = requests.get(guardrails.url + "/v1/audit/verify", headers=auth("ops"), timeout=5).json()
    assert r["ok"] is False and r["first_broken_seq"] == bad


def test_verify_catches_a_rehashed_edit_at_the_next_link(guardrails, sql):
    """An attacker who also recomputes the edited row's hash breaks the link from the following entry."""
    _fill(guardrails)
    with sql.transaction():
        sql.execute("SET LOCAL session_replication_role = replica")
        sql.execute("UPDATE guardrails.audit_log SET actor = 'mallory' WHERE seq = 3")
        row = sql.execute("SELECT prev_hash, guardrails.audit_canonical(seq, at, kind, actor, run_id, task, subject, "
                          "data) AS c FROM guardrails.audit_log WHERE seq = 3").fetchone()
        sql.execute("UPDATE guardrails.audit_log SET hash = %s WHERE seq = 3",
                    (service.entry_hash(row["prev_hash"], row["c"]),))
    with guardrails.pool.connection() as conn:
        result = service.verify_audit(conn)
    assert (result.ok, result.first_broken_seq) == (False, 4) and "does not link" in result.problem


def test_verify_catches_deleted_rows(guardrails, sql):
    _fill(guardrails)
    _tamper(sql, "DELETE FROM guardrails.audit_log WHERE seq = 4")
    with guardrails.pool.connection() as conn:
        result = service.verify_audit(conn)
    assert (result.ok, result.first_broken_seq) == (False, 4) and "missing" in result.problem
    # Deleting from the end is caught by the chain head.
    _tamper(sql, "DELETE FROM guardrails.audit_log WHERE seq >= 4")
    with guardrails.pool.connection() as conn:
        result = service.verify_audit(conn)
    assert (result.ok, result.first_broken_seq) == (False, 4) and "deleted from the end" in result.problem


def test_query_filters_and_ndjson_export(guardrails):
    ids = _fill(guardrails)
    r = requests.get(guardrails.url + "/v1/audit", params={"run_id": ids[1]}, headers=auth("ops"), timeout=5)
    assert [e["kind"] for e in r.json()] == ["run.opened", "run.finished"]
    assert all(e["run_id"] == ids[1] for e in r.json())
    r = requests.get(guardrails.url + "/v1/audit", params={"kind": "run.*", "limit": 2}, headers=auth("ops"),
                     timeout=5)
    assert [e["kind"] for e in r.json()] == ["run.opened", "run.finished"]
    r = requests.get(guardrails.url + "/v1/audit/export", params={"task": "triage"}, headers=auth("ops"), timeout=5)
    assert r.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) == 6 and [x["seq"] for x in lines] == sorted(x["seq"] for x in lines)
    first_at = lines[0]["at"]
    r = requests.get(guardrails.url + "/v1/audit", params={"since": first_at, "kind": "run.finished"},
                     headers=auth("ops"), timeout=5)
    assert len(r.json()) == 3
    bad = requests.get(guardrails.url + "/v1/audit", params={"run_id": "nope"}, headers=auth("ops"), timeout=5)
    assert bad.status_code == 400 and "run_id" in bad.json()["errors"]
    assert requests.get(guardrails.url + "/v1/audit", headers=auth("triage"), timeout=5).status_code == 403


def test_concurrent_appends_keep_one_chain(guardrails):
    import threading

    def worker() -> None:
        with guardrails.pool.connection() as conn:
            for i in range(20):
                repo.audit_append(conn, kind="test.entry", actor="t", data={"i": i})

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with guardrails.pool.connection() as conn:
        result = service.verify_audit(conn)
    assert result.ok and result.checked == 121
