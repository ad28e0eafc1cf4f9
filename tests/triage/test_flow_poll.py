"""The polling twin in real n8n: JQL for recent tickets through triage's read-only Jira client, same path as
the webhook flow, never the same ticket twice (shared claims with the webhook flow)."""
from __future__ import annotations

import functools
from typing import Any

import psycopg
import pytest

from tests.conftest import auth
from tests.fixtures.waiting import wait_until

from .conftest import answered, delta

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("n8n"), pytest.mark.usefixtures("quiet_n8n")]


def _runs(services: Any) -> list[dict[str, Any]]:
    r = services.get("guardrails", "/v1/runs?task=triage&limit=1000", caller="ops")
    return [x for x in r.json() if x["workflow"] in ("triage-jira-poll", "triage-jira-webhook")]


def _intake(database_url: str) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT source, outcome, issue_key FROM triage.intake ORDER BY id").fetchall()


def _results(database_url: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        return [r[0] for r in conn.execute("SELECT ticket_key FROM triage.results ORDER BY id").fetchall()]


_wait = functools.partial(wait_until, timeout=45.0)


def test_poll_triages_new_tickets_once(stack, emu) -> None:
    n8n, services = stack.n8n, stack.services
    assert n8n.webhook("metis-triage-poll", json={}).status_code == 403  # the ops trigger needs the n8n token
    keys = emu.jira_seed([{"project": "SUP", "summary": f"Roster page slow for location {i}", "issuetype": "Bug"}
                          for i in range(3)])
    assert n8n.webhook("metis-triage-poll", json={}, headers=auth("n8n")).status_code == 200
    _wait(lambda: len(_results(services.database_url)) == 3)
    runs = _runs(services)
    assert sorted(r["external_id"] for r in runs) == sorted(
        f"jira-issue:{emu.jira_state()['issues'][k]['id']}" for k in keys)
    assert {r["workflow"] for r in runs} == {"triage-jira-poll"}
    # A second poll sees the same tickets in its window and accepts none of them.
    assert n8n.webhook("metis-triage-poll", json={}, headers=auth("n8n")).status_code == 200
    _wait(lambda: [x for x in _intake(services.database_url) if x[1] == "duplicate"])
    _wait(lambda: len([x for x in _intake(services.database_url) if x[1] == "duplicate"]) == 3)
    assert sorted(_results(services.database_url)) == sorted(keys)
    assert len(_runs(services)) == 3


def test_a_ticket_seen_by_the_webhook_is_not_polled_again(stack, emu) -> None:
    n8n, services = stack.n8n, stack.services
    emu.jira_register_webhook(f"{n8n.url}/webhook/metis-triage-jira", events=["jira:issue_created"])
    key = emu.jira_seed([{"project": "SUP", "summary": "Payslip PDF shows wrong YTD", "issuetype": "Bug"}],
                        fire_webhooks=True)[0]
    _wait(lambda: _results(services.database_url) == [key])
    assert n8n.webhook("metis-triage-poll", json={}, headers=auth("n8n")).status_code == 200
    _wait(lambda: ("poll", "duplicate", key) in _intake(services.database_url))
    assert _results(services.database_url) == [key]
    assert [r["workflow"] for r in _runs(services)] == ["triage-jira-webhook"]


def test_refused_runs_are_recorded_once_each_and_the_tickets_come_back_on_the_next_poll(stack, emu) -> None:
    n8n, services = stack.n8n, stack.services
    r = services.post("guardrails", "/v1/kill-switch/engage", caller="ops",
                      json={"actor": "ops@example.com", "reason": "budget review"})
    assert r.status_code == 200, r.text
    keys = emu.jira_seed([{"project": "SUP", "summary": f"Leave request stuck in pending {i}", "issuetype": "Task"}
                          for i in range(2)])
    before = answered(services, "guardrails", "POST", "/v1/runs")
    assert n8n.webhook("metis-triage-poll", json={}, headers=auth("n8n")).status_code == 200
    _wait(lambda: len([x for x in _intake(services.database_url) if x[1] == "refused"]) == 2)
    execution = n8n.wait_for_execution(workflow_id="metisTriagePoll01", statuses=("success", "error", "crashed"))
    assert execution["status"] == "success", execution
    # One attempt per ticket, no retries.
    assert delta(answered(services, "guardrails", "POST", "/v1/runs"), before) == {"403": 2}
    assert sorted(_intake(services.database_url)) == sorted(
        [("poll", "accepted", k) for k in keys] + [("poll", "refused", k) for k in keys])
    assert _results(services.database_url) == [] and _runs(services) == []
    # Released: the next poll finds both tickets again (their claims were given back) and triages them once.
    r = services.post("guardrails", "/v1/kill-switch/release", caller="ops",
                      json={"actor": "ops@example.com", "reason": "budget approved"})
    assert r.status_code == 200, r.text
    assert n8n.webhook("metis-triage-poll", json={}, headers=auth("n8n")).status_code == 200
    _wait(lambda: len(_results(services.database_url)) == 2)
    assert sorted(_results(services.database_url)) == sorted(keys)
    assert delta(answered(services, "guardrails", "POST", "/v1/runs"), before) == {"403": 2, "201": 2}
