"""Back-fill from the Jira emulator (REST v3 JQL search, nextPageToken paging, Basic auth), resumable."""
from __future__ import annotations

from typing import Any, Callable

import psycopg
import pytest
from flask import Flask

from services.dedupe.backfill import JiraSearch, JiraSearchError, backfill
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
    jira = JiraSearch(emu.jira_url, *emu.jira_auth)
    # Page 1 succeeds, then Jira fails: the cursor stays after page 1.
    calls = {"n": 0}
    real_page = jira.page

    def flaky(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise JiraSearchError("Jira search → 503")
        return real_page(*a, **kw)

    jira.page = flaky  # type: ignore[method-assign]
    with pytest.raises(JiraSearchError):
        backfill(engine=engine, jira=jira, jql="project = PAY ORDER BY created ASC", name="pay", page_size=3)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT tickets, done, next_page_token FROM dedupe.backfill_cursors WHERE name = 'pay'"
                           ).fetchone()
    assert row is not None and row[0] == 3 and row[1] is False and row[2]
    done = backfill(engine=engine, jira=JiraSearch(emu.jira_url, *emu.jira_auth),
                    jql="project = PAY ORDER BY created ASC", name="pay", page_size=3)
    assert done == {"pages": 2, "tickets": 4, "resumed": True, "done": True}
    c = app.test_client()
    stats = c.get("/v1/index", headers=auth("n8n")).get_json()
    assert stats["tickets"] == 7
    body = c.post("/v1/duplicates", json={"ticket": {"summary": "Payslip rounding error case 5"}},
                  headers=auth("n8n")).get_json()
    top = body["candidates"][0]
    assert top["key"] in keys and top["status"] == "To Do" and top["project"] == "PAY"
    # A finished back-fill does nothing the second time; a wrong password is a clear error.
    again = backfill(engine=engine, jira=JiraSearch(emu.jira_url, *emu.jira_auth),
                     jql="project = PAY ORDER BY created ASC", name="pay")
    assert again["done"] and again["tickets"] == 0
    with pytest.raises(JiraSearchError, match="401"):
        backfill(engine=engine, jira=JiraSearch(emu.jira_url, emu.jira_user, "wrong"), jql="project = PAY",
                 name="other")
