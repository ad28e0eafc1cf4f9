"""Back-fill from the Jira emulator (REST v3 JQL search, nextPageToken paging, Basic auth), resumable."""
from __future__ import annotations

import time
from typing import Any, Callable

import psycopg
import pytest
import requests
from flask import Flask

from services.dedupe.backfill import backfill
from shared.connectors.http import ConnectorError, RetryPolicy
from shared.connectors.jira import JiraClient
from tests.conftest import auth

pytestmark = pytest.mark.xdist_group("dedupe")


def seed(emu: Any, n: int) -> list[str]:
    return emu.jira_seed([{"project": "PAY", "summary": f"Payslip rounding error case {i}",
                           "description": f"Net pay is off by one cent for employee group {i}.",
                           "status": "To Do", "priority": "High", "components": ["payroll"], "labels": ["rounding"],
                           "created": f"2024-03-{i + 1:02d}T10:00:00.000+0000"} for i in range(n)])


def test_backfill_pages_and_resumes_after_a_failure(make_app: Callable[..., Flask], emu: Any,
                                                    database_url: str) -> None:
    app = make_app()
    engine = app.extensions["metis"].state["engine"]
    keys = seed(emu, 7)
    jql = "project = PAY ORDER BY created ASC"
    quick = RetryPolicy(attempts=3, base_delay=0.05, max_delay=2.0, budget_seconds=5.0)
    # Jira rate-limits the first page once (429, Retry-After 1): waited out, not a failure.
    emu.jira_fault("/rest/api/3/search/jql", status=429, count=1, retry_after="1")
    # After page 1 is stored, Jira starts failing for good (503 on every call): the back-fill stops there.
    pages: list[int] = []

    def after_page(n: int) -> None:
        pages.append(n)
        if len(pages) == 1:
            emu.jira_fault("/rest/api/3/search/jql", status=503, count=None)

    t0 = time.monotonic()
    with pytest.raises(ConnectorError) as err:
        backfill(engine=engine, jira=JiraClient(emu.jira_url, *emu.jira_auth, policy=quick), jql=jql, name="pay",
                 page_size=3, progress=after_page)
    # Page 1 arrived despite the 429, after the 1 s Retry-After (the policy's own delay is 0.05 s).
    assert pages == [3] and time.monotonic() - t0 >= 1.0
    assert err.value.status == 503 or "retry budget" in str(err.value)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT tickets, done, next_page_token FROM dedupe.backfill_cursors WHERE name = 'pay'"
                           ).fetchone()
    assert row is not None and row[0] == 3 and row[1] is False and row[2]
    # Jira is back: the rerun resumes after page 1 (4 tickets left, not 7) and finishes.
    requests.delete(emu.jira_url + "/_emulator/jira/faults", timeout=10).raise_for_status()
    done = backfill(engine=engine, jira=JiraClient(emu.jira_url, *emu.jira_auth, policy=quick), jql=jql,
                    name="pay", page_size=3)
    assert done == {"pages": 2, "tickets": 4, "resumed": True, "done": True}
    c = app.test_client()
    stats = c.get("/v1/index", headers=auth("n8n")).get_json()
    assert stats["tickets"] == 7
    body = c.post("/v1/duplicates", json={"ticket": {"summary": "Payslip rounding error case 5"}},
                  headers=auth("n8n")).get_json()
    top = body["candidates"][0]
    assert top["key"] in keys and top["status"] == "To Do" and top["project"] == "PAY"
    # A finished back-fill does nothing the second time; a wrong password is a clear error, never retried.
    again = backfill(engine=engine, jira=JiraClient(emu.jira_url, *emu.jira_auth), jql=jql, name="pay")
    assert again["done"] and again["tickets"] == 0
    with pytest.raises(ConnectorError, match="401") as err:
        backfill(engine=engine, jira=JiraClient(emu.jira_url, emu.jira_user, "wrong"), jql="project = PAY",
                 name="other")
    assert err.value.status == 401 and not err.value.retryable


def test_the_backfill_command_reports_a_failure_clearly_and_resumes(emu: Any, database_url: str) -> None:
    """`metis dedupe backfill` as an operator runs it (a subprocess with the real model): a Jira that keeps
    failing is a one-line error naming the way on and exit 1, nothing half-written; the same command then
    indexes everything with a progress bar, and a third run finds it done."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    seed(emu, 5)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DATABASE_URL": database_url, "METIS_JIRA_URL": emu.jira_url,
           "METIS_JIRA_EMAIL": emu.jira_auth[0], "METIS_JIRA_API_TOKEN": emu.jira_auth[1],
           "METIS_CONFIG_DIR": str(root / "config")}
    argv = [str(Path(sys.executable).parent / "metis"), "dedupe", "backfill", "--jql", "project = PAY ORDER BY created ASC",
            "--name", "cli", "--page-size", "2"]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, timeout=300)

    emu.jira_fault("/rest/api/3/search/jql", status=503, count=None)
    try:
        failed = run()
    finally:
        requests.delete(emu.jira_url + "/_emulator/jira/faults", timeout=10).raise_for_status()
    assert failed.returncode == 1, failed.stderr
    assert "→ 503" in failed.stderr and "run the same command again to resume" in failed.stderr
    assert "Traceback" not in failed.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM dedupe.tickets WHERE project = 'PAY'").fetchone() == (0,)
    done = run()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"pages": 3, "tickets": 5, "resumed": False,
                                                                 "done": True}
    assert "back-fill cli" in done.stderr and "5ticket" in done.stderr.replace(" ", "")  # tqdm's progress bar
    again = run()
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["tickets"] == 0
