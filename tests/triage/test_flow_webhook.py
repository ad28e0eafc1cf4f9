"""The triage webhook flow in real n8n: Jira emulator → signed webhook → n8n → triage intake → run → triage."""
from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import psycopg
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("n8n"), pytest.mark.usefixtures("quiet_n8n")]

HOOK = "metis-triage-jira"
WORKFLOW = "metisTriageJira01"


def _runs(services: Any, external_id: str) -> list[dict[str, Any]]:
    r = services.get("guardrails", "/v1/runs?task=triage&limit=1000", caller="ops")
    return [x for x in r.json() if x["external_id"] == external_id]


def _intake(database_url: str) -> list[tuple[str, str | None, str | None]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT outcome, reason, issue_key FROM triage.intake ORDER BY id").fetchall()


def _results(database_url: str) -> list[tuple[str, str]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT ticket_key, run_id FROM triage.results ORDER BY id").fetchall()


def _wait(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_forged_webhook_is_rejected_and_nothing_runs(stack, emu) -> None:
    n8n, services = stack.n8n, stack.services
    emu.jira_register_webhook(f"{n8n.url}/webhook/{HOOK}", events=["jira:issue_created"], secret="not-the-secret-x")
    key = emu.jira_seed([{"project": "SUP", "summary": "Kiosk clock-in late", "issuetype": "Bug"}],
                        fire_webhooks=True)[0]
    # Jira retries a refused delivery; wait until it gives up so that nothing arrives after this test.
    deliveries = _wait(lambda: [d for d in emu.jira_state()["deliveries"] if d["status"] == "failed"])
    assert [a["status"] for a in deliveries[0]["attempts"]] == [401, 401, 401]
    rows = _intake(services.database_url)
    assert rows == [("rejected", "invalid_signature", None)] * 3
    assert _results(services.database_url) == []
    issue_id = emu.jira_state()["issues"][key]["id"]
    assert _runs(services, f"jira-issue:{issue_id}") == []


def _seed_history(services: Any) -> None:
    """Resolved, labelled tickets in dedupe so the offline vote is confident and proposes."""
    history = [{"key": f"HIST-{i}", "summary": f"Annual leave balance negative after the accrual run {i}",
                "description": "Employees show negative leave balances after the nightly accrual job.",
                "status": "Resolved", "resolution": "Fixed", "resolution_text": "Reverted the doubled accrual run.",
                "priority": "Critical", "components": ["leave-engine"], "labels": ["category-leave"],
                "project": "HIST", "created": "2025-01-01T10:00:00+00:00"} for i in range(6)]
    _wait(lambda: services.get("dedupe", "/readyz").status_code == 200, timeout=180)
    assert services.post("dedupe", "/v1/tickets", caller="ops", json={"tickets": history}).status_code == 200


def test_signed_webhook_opens_one_run_and_proposes_once_even_when_redelivered(stack, emu) -> None:
    n8n, services = stack.n8n, stack.services
    _seed_history(services)
    emu.jira_register_webhook(f"{n8n.url}/webhook/{HOOK}", events=["jira:issue_created"])
    key = emu.jira_seed([{"project": "SUP", "summary": "Annual leave balance negative after accrual run",
                          "description": "30 employees show negative balances since last night.",
                          "issuetype": "Bug"}], fire_webhooks=True)[0]
    issue_id = emu.jira_state()["issues"][key]["id"]
    runs = _wait(lambda: [r for r in _runs(services, f"jira-issue:{issue_id}") if r["status"] != "open"])
    assert len(runs) == 1 and runs[0]["status"] == "succeeded", runs
    emu._post(emu.jira_url + "/_emulator/jira/webhooks/redeliver", {})
    _wait(lambda: [r for r in _intake(services.database_url) if r[0] == "duplicate"])
    assert [r[0] for r in _intake(services.database_url)] == ["accepted", "duplicate"]
    delivered = emu.jira_state()["deliveries"]
    assert [a["status"] for d in delivered for a in d["attempts"]] == [202, 200]
    assert [r[0] for r in _results(services.database_url)] == [key]
    assert len(_runs(services, f"jira-issue:{issue_id}")) == 1
    # The normal proposal, through guardrails: labels allowlisted and written, the comment awaits approval.
    actions = services.get("guardrails", f"/v1/actions?run_id={runs[0]['id']}", caller="ops").json()
    assert sorted((a["operation"], a["target"], a["status"]) for a in actions) == \
        [("add_comment", key, "pending_approval"), ("add_labels", key, "executed")]
    assert "category-leave" in emu.jira_state()["issues"][key]["fields"]["labels"]
    assert emu.jira_state()["comments"][key] == []
    assert runs[0]["outcome"]["needs_human"] is False and len(runs[0]["outcome"]["actions"]) == 2


def test_a_ticket_without_evidence_is_escalated_through_the_flow(stack, emu) -> None:
    n8n, services = stack.n8n, stack.services
    emu.jira_register_webhook(f"{n8n.url}/webhook/{HOOK}", events=["jira:issue_created"])
    key = emu.jira_seed([{"project": "SUP", "summary": "Something is odd", "issuetype": "Task"}],
                        fire_webhooks=True)[0]
    issue_id = emu.jira_state()["issues"][key]["id"]
    run = _wait(lambda: [r for r in _runs(services, f"jira-issue:{issue_id}") if r["status"] != "open"])[0]
    assert run["status"] == "succeeded" and run["outcome"]["needs_human"] is True
    assert services.get("guardrails", f"/v1/actions?run_id={run['id']}", caller="ops").json() == []
    esc = services.get("guardrails", f"/v1/escalations?run_id={run['id']}", caller="ops").json()
    assert [e["subject"] for e in esc] == [key]
    assert emu.jira_state()["issues"][key]["fields"]["labels"] == []


@pytest.mark.parametrize("body, code", [(b"", "malformed_body"), (b"[1, 2]", "malformed_body"),
                                        (b'{"webhookEvent": "jira:issue_deleted", "issue": {}}', "unknown_event"),
                                        (b'{"webhookEvent": "jira:issue_created"}', "missing_issue")])
def test_bad_bodies_through_n8n_are_4xx_and_recorded(stack, emu, body: bytes, code: str) -> None:
    n8n, services = stack.n8n, stack.services
    r = n8n.webhook(HOOK, data=body, headers=_signed_headers(emu, body))
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert _intake(services.database_url) == [("rejected", code, None)]
    assert _results(services.database_url) == []


def test_unparseable_json_is_refused_by_n8n_itself(stack, emu) -> None:
    # n8n's body parser answers 422 before any workflow starts, so triage never sees it (n8n logs it).
    n8n, services = stack.n8n, stack.services
    body = b"{not json"
    r = n8n.webhook(HOOK, data=body, headers=_signed_headers(emu, body))
    assert r.status_code == 422 and "Failed to parse request body" in r.text
    assert _intake(services.database_url) == [] and _results(services.database_url) == []


def _signed_headers(emu: Any, body: bytes) -> dict[str, str]:
    sig = "sha256=" + hmac.new(emu.jira_webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature": sig, "X-Atlassian-Webhook-Identifier": "bad-1"}
