"""The triage webhook flow in real n8n: Jira emulator → signed webhook → n8n → triage intake → run → triage."""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import time
from typing import Any

import psycopg
import pytest

from tests.fixtures.waiting import wait_until

from .conftest import answered, delta, seed_history

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


_wait = functools.partial(wait_until, timeout=30.0)


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


def test_signed_webhook_opens_one_run_and_proposes_once_even_when_redelivered(stack, emu) -> None:
    n8n, services = stack.n8n, stack.services
    seed_history(services)
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


def test_a_reused_idempotency_key_through_the_flow_is_recorded_not_retried(stack, emu) -> None:
    """The ticket's comment key (`triage:<KEY>:add_comment`) already names a different write at guardrails: the
    409 is recorded on the comment in the run's outcome, the labels still go through, triage is called once,
    guardrails is asked once per proposal, the run succeeds."""
    n8n, services = stack.n8n, stack.services
    seed_history(services)
    emu.jira_register_webhook(f"{n8n.url}/webhook/{HOOK}", events=["jira:issue_created"])
    key = emu.jira_seed([{"project": "SUP", "summary": "Annual leave balance negative after accrual run",
                          "issuetype": "Bug"}])[0]
    opened = services.post("guardrails", "/v1/runs", caller="triage", json={
        "task": "triage", "trigger": "manual", "workflow": "an earlier triage", "external_id": f"earlier-{key}"})
    earlier = services.post("guardrails", "/v1/actions", caller="triage", json={
        "run_id": opened.json()["id"], "connector": "jira", "operation": "add_comment", "target": key,
        "payload": {"body": "An earlier suggestion.", "internal": True}, "idempotency_key": f"triage:{key}:add_comment",
        "reason": "an earlier triage"})
    assert earlier.status_code == 201, earlier.text
    actions_before = answered(services, "guardrails", "POST", "/v1/actions")
    triage_before = answered(services, "triage", "POST", "/v1/triage")
    issue = emu.jira_state()["issues"][key]
    body = json.dumps({"webhookEvent": "jira:issue_created", "timestamp": 1, "issue": issue}).encode()
    r = n8n.webhook(HOOK, data=body, headers={**_signed_headers(emu, body), "X-Atlassian-Webhook-Identifier": key})
    assert r.status_code == 202, r.text
    run = _wait(lambda: [x for x in _runs(services, f"jira-issue:{issue['id']}") if x["status"] != "open"])[0]
    assert run["status"] == "succeeded" and run["outcome"]["refused"] == "idempotency_key_reused", run
    # The comment is refused; the labels, independent of it, are still proposed (allowlisted) and written.
    assert [(a["operation"], a["status"], a.get("code")) for a in run["outcome"]["actions"]] == \
        [("add_comment", "refused", "idempotency_key_reused"), ("add_labels", "executed", None)]
    assert delta(answered(services, "guardrails", "POST", "/v1/actions"), actions_before) == {"409": 1, "201": 1}
    assert delta(answered(services, "triage", "POST", "/v1/triage"), triage_before) == {"200": 1}
    listed = services.get("guardrails", f"/v1/actions?target={key}", caller="ops").json()
    assert sorted((a["operation"], a["id"]) for a in listed) == sorted(
        [("add_comment", earlier.json()["id"]), ("add_labels", run["outcome"]["actions"][1]["id"])])
    assert "category-leave" in emu.jira_state()["issues"][key]["fields"]["labels"]
    assert emu.jira_state()["comments"][key] == []


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


def _intake_detail(database_url: str) -> list[tuple[str, str, str | None, str | None, str | None]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT source, outcome, reason, issue_key, detail FROM triage.intake "
                            "ORDER BY id").fetchall()


def test_a_refused_run_is_answered_and_recorded_once_without_retries(stack, emu) -> None:
    """Kill switch engaged: guardrails refuses the run (403). n8n asks once, records why, answers Jira 200 (a
    refusal is final: no redelivery), triages nothing; the ticket is given back, so a redelivery after the
    release triages it."""
    n8n, services = stack.n8n, stack.services
    r = services.post("guardrails", "/v1/kill-switch/engage", caller="ops",
                      json={"actor": "ops@example.com", "reason": "incident 42: stop all jobs"})
    assert r.status_code == 200 and r.json()["engaged"] is True, r.text
    emu.jira_register_webhook(f"{n8n.url}/webhook/{HOOK}", events=["jira:issue_created"])
    before = answered(services, "guardrails", "POST", "/v1/runs")
    key = emu.jira_seed([{"project": "SUP", "summary": "Payslip PDF shows the wrong pay period",
                          "issuetype": "Bug"}], fire_webhooks=True)[0]  # delivered synchronously
    execution = n8n.wait_for_execution(workflow_id=WORKFLOW, statuses=("success", "error", "crashed"))
    assert execution["status"] == "success", execution
    deliveries = emu.jira_state()["deliveries"]
    assert [a["status"] for d in deliveries for a in d["attempts"]] == [200]
    assert delta(answered(services, "guardrails", "POST", "/v1/runs"), before) == {"403": 1}
    rows = _intake_detail(services.database_url)
    assert [r[:4] for r in rows] == [("webhook", "accepted", None, key),
                                     ("webhook", "refused", "kill_switch_engaged", key)]
    assert rows[1][4] == ("guardrails answered 403: the kill switch is engaged by ops@example.com: "
                          "incident 42: stop all jobs")
    issue_id = emu.jira_state()["issues"][key]["id"]
    assert _runs(services, f"jira-issue:{issue_id}") == [] and _results(services.database_url) == []
    assert services.get("guardrails", "/v1/actions", caller="ops").json() == []
    state = emu.jira_state()
    assert state["comments"][key] == [] and state["issues"][key]["fields"]["labels"] == []

    # Released: the same delivery again is triaged (the refusal gave the claim back).
    r = services.post("guardrails", "/v1/kill-switch/release", caller="ops",
                      json={"actor": "ops@example.com", "reason": "incident 42 over"})
    assert r.status_code == 200 and r.json()["engaged"] is False
    emu._post(emu.jira_url + "/_emulator/jira/webhooks/redeliver", {})
    run = _wait(lambda: [x for x in _runs(services, f"jira-issue:{issue_id}") if x["status"] != "open"])
    assert len(run) == 1 and run[0]["status"] == "succeeded"
    assert _results(services.database_url) == [(key, run[0]["id"])]
    assert delta(answered(services, "guardrails", "POST", "/v1/runs"), before) == {"403": 1, "201": 1}
    assert [a["status"] for d in emu.jira_state()["deliveries"] for a in d["attempts"]] == [200, 202]


def test_guardrails_failing_is_tried_three_times_then_left_for_redelivery(stack, emu) -> None:
    """guardrails answers 500 (its runs table is briefly renamed away): n8n asks three times, 2 s apart, and no
    more; it records why, gives the ticket back and answers 503 so Jira delivers again. Once guardrails is back,
    the next delivery is triaged."""
    n8n, services = stack.n8n, stack.services
    key = emu.jira_seed([{"project": "SUP", "summary": "Roster publish button does nothing", "issuetype": "Bug"}])[0]
    issue = emu.jira_state()["issues"][key]
    body = json.dumps({"webhookEvent": "jira:issue_created", "timestamp": 1, "issue": issue}).encode()
    headers = {**_signed_headers(emu, body), "X-Atlassian-Webhook-Identifier": f"outage-{key}"}
    before = answered(services, "guardrails", "POST", "/v1/runs")
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE guardrails.runs RENAME TO runs_unavailable")
        try:
            t0 = time.monotonic()
            r = n8n.webhook(HOOK, data=body, headers=headers)
            took = time.monotonic() - t0
            time.sleep(3)  # a fourth attempt would come 2 s after the third
            attempts = delta(answered(services, "guardrails", "POST", "/v1/runs"), before)
        finally:
            conn.execute("ALTER TABLE guardrails.runs_unavailable RENAME TO runs")
    assert r.status_code == 503, r.text
    assert r.json() == {"accepted": False, "outcome": "refused", "issue_key": key, "reason": "internal_error",
                        "detail": "an unexpected error occurred; see the service log with this request id"}
    assert attempts == {"500": 3} and took >= 4, (attempts, took)
    rows = _intake_detail(services.database_url)
    assert [r[:4] for r in rows] == [("webhook", "accepted", None, key), ("webhook", "refused", "internal_error", key)]
    assert rows[1][4].startswith("guardrails answered 500: ")
    assert _results(services.database_url) == []
    # guardrails is back: the redelivery is accepted again (the claim was given back) and triaged once.
    r = n8n.webhook(HOOK, data=body, headers=headers)
    assert r.status_code == 202 and r.json()["accepted"] is True and r.json()["run_id"], r.text
    _wait(lambda: _results(services.database_url))
    assert _results(services.database_url) == [(key, r.json()["run_id"])]
    assert delta(answered(services, "guardrails", "POST", "/v1/runs"), before) == {"500": 3, "201": 1}


def _signed_headers(emu: Any, body: bytes) -> dict[str, str]:
    sig = "sha256=" + hmac.new(emu.jira_webhook_secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature": sig, "X-Atlassian-Webhook-Identifier": "bad-1"}
