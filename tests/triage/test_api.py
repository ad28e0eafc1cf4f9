"""The triage HTTP API with a real database: validation, webhook intake (signatures, idempotency), polling."""
from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
from flask.testing import FlaskClient

from devstack.processes import free_port
from services.triage.app import create_app
from tests.conftest import auth

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "data" / "fixtures" / "jira-webhooks"
SECRET = "whsec-" + "a" * 30


@pytest.fixture
def client(make_settings: Any) -> Iterator[FlaskClient]:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: dedupe and guardrails are "down"
    app = create_app(make_settings("triage", dedupe_url=nowhere, guardrails_url=nowhere),
                     llm_enabled=False, webhook_secret=SECRET)
    with app.test_client() as c:
        yield c
    app.extensions["metis"].pool.close()


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-Hub-Signature": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
            "Content-Type": "application/json", **auth("n8n")}


def created_body() -> bytes:
    return (FIXTURES / "mattermost_jira_issue_created.json").read_bytes()


def intake_rows(database_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT outcome, reason, issue_key, delivery_id FROM triage.intake ORDER BY id").fetchall()


def test_bad_triage_bodies_are_400_naming_the_field(client: FlaskClient) -> None:
    r = client.post("/v1/triage", json={"ticket": {"summary": "x"}, "run_id": "nope"}, headers=auth("n8n"))
    assert r.status_code == 400 and r.content_type == "application/problem+json"
    errors = r.get_json()["errors"]
    assert "key" in errors["ticket"] and "run_id" in errors
    r = client.post("/v1/triage", json={"ticket": {"key": "PAY-1", "summary": "s", "description": 5},
                                        "run_id": str(uuid.uuid4())}, headers=auth("n8n"))
    assert r.status_code == 400 and "description" in r.get_json()["errors"]["ticket"]
    r = client.post("/v1/triage", data="not json", headers={**auth("n8n"), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.get_json()["code"] == "invalid_json"
    assert client.post("/v1/triage", json={}).status_code == 401
    r = client.post("/v1/triage", json={"ticket": {"key": "PAY-1", "summary": "s"}, "run_id": str(uuid.uuid4())},
                    headers=auth("digest"))
    assert r.status_code == 403


def test_dry_run_answers_with_every_field_and_stores_nothing(client: FlaskClient, database_url: str) -> None:
    run_id = str(uuid.uuid4())
    r = client.post("/v1/triage", headers=auth("n8n"), json={
        "run_id": run_id, "submit": False,
        "ticket": {"key": "PAY-42", "summary": "Annual leave balance negative after accrual run",
                   "description": {"type": "doc", "version": 1, "content": []}}})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["mode"] == "offline" and body["fallback_reason"] == "LLM mode not configured"
    assert body["category"] == "leave"
    assert body["needs_human"] is True and body["proposals"] == [] and body["escalation"]["subject"] == "PAY-42"
    assert any("similar-ticket search unavailable" in n for n in body["notes"])
    assert body["cost"]["usd"] == 0 and body["submission"] is None
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM triage.results").fetchone()[0] == 0  # type: ignore[index]


def test_guardrails_down_is_a_503_and_the_triage_is_kept_for_the_retry(client: FlaskClient, database_url: str) -> None:
    run_id = str(uuid.uuid4())
    req = {"run_id": run_id, "ticket": {"key": "PAY-43", "summary": "Kiosk clock-in wrong"}}
    r = client.post("/v1/triage", headers=auth("n8n"), json=req)
    assert r.status_code == 503 and r.get_json()["code"] == "guardrails_unavailable"
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT run_id, submission FROM triage.results").fetchall()
    assert rows == [(run_id, None)]


def test_signed_webhook_is_accepted_once(client: FlaskClient, database_url: str) -> None:
    body = created_body()
    headers = {**signed(body), "X-Atlassian-Webhook-Identifier": "d-1"}
    r = client.post("/v1/intake/jira-webhook", data=body, headers=headers)
    assert r.status_code == 200, r.get_json()
    got = r.get_json()
    assert got["outcome"] == "accepted" and got["issue_key"] == "TES-41" and got["external_id"] == "jira-issue:10040"
    assert got["ticket"]["key"] == "TES-41" and got["ticket"]["issue_type"] == "Story"
    again = client.post("/v1/intake/jira-webhook", data=body, headers=headers)
    assert again.status_code == 200 and again.get_json()["outcome"] == "duplicate"
    polled = client.post("/v1/intake/poll", headers=auth("n8n"),
                         json={"issues": [json.loads(body)["issue"]]})
    assert polled.get_json() == {"accepted": [], "duplicates": ["TES-41"], "rejected": [], "skipped": None}
    assert [(x["outcome"], x["delivery_id"]) for x in intake_rows(database_url)] == \
        [("accepted", "d-1"), ("duplicate", "d-1"), ("duplicate", None)]


@pytest.mark.parametrize("mutate, status, code", [
    (lambda b, h: (b, {**h, "X-Hub-Signature": "sha256=" + "0" * 64}), 401, "invalid_signature"),
    (lambda b, h: (b, {k: v for k, v in h.items() if k != "X-Hub-Signature"}), 401, "invalid_signature"),
    (lambda b, h: (b + b" ", h), 401, "invalid_signature"),  # body changed after signing
    (lambda b, h: (b"{not json", signed(b"{not json")), 400, "malformed_body"),
    (lambda b, h: (b"[1, 2]", signed(b"[1, 2]")), 400, "malformed_body"),
    (lambda b, h: (_with(b, webhookEvent="jira:issue_deleted"), signed(_with(b, webhookEvent="jira:issue_deleted"))),
     422, "unknown_event"),
    (lambda b, h: (_with(b, issue=None), signed(_with(b, issue=None))), 400, "missing_issue"),
    (lambda b, h: (_with(b, webhookEvent=None), signed(_with(b, webhookEvent=None))), 400, "missing_event"),
])
def test_bad_deliveries_are_rejected_and_recorded(client: FlaskClient, database_url: str, mutate: Any, status: int,
                                                  code: str) -> None:
    body = created_body()
    data, headers = mutate(body, signed(body))
    r = client.post("/v1/intake/jira-webhook", data=data, headers=headers)
    assert r.status_code == status and r.get_json()["code"] == code
    assert [(x["outcome"], x["reason"]) for x in intake_rows(database_url)] == [("rejected", code)]
    listed = client.get("/v1/intake?outcome=rejected", headers=auth("ops")).get_json()
    assert [x["reason"] for x in listed] == [code]


def _with(body: bytes, **changes: Any) -> bytes:
    doc = json.loads(body)
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    return json.dumps(doc).encode()


def test_poll_accepts_new_issues_once_and_rejects_broken_ones(client: FlaskClient) -> None:
    issues = [{"id": "1", "key": "PAY-1", "fields": {"summary": "a", "issuetype": {"name": "Bug"},
                                                     "description": {"type": "doc", "version": 1, "content": [
                                                         {"type": "paragraph", "content": [{"type": "text",
                                                                                            "text": "body"}]}]}}},
              {"id": "2", "key": "PAY-2", "fields": {"summary": "b"}},
              {"key": "not a key", "fields": {}}]
    first = client.post("/v1/intake/poll", headers=auth("n8n"), json={"issues": issues}).get_json()
    assert [a["issue_key"] for a in first["accepted"]] == ["PAY-1", "PAY-2"]
    assert first["accepted"][0]["ticket"]["description"] == "body\n"
    assert first["rejected"][0]["reason"] == "missing_issue"
    second = client.post("/v1/intake/poll", headers=auth("n8n"), json={"issues": issues[:2]}).get_json()
    assert second["accepted"] == [] and second["duplicates"] == ["PAY-1", "PAY-2"]
    assert client.post("/v1/intake/poll", headers=auth("n8n"), json={"issues": "x"}).status_code == 400


def test_scheduled_poll_does_nothing_while_polling_is_off(client: FlaskClient) -> None:
    r = client.post("/v1/intake/jira-poll", headers=auth("n8n"), json={"trigger": "schedule"})
    assert r.status_code == 200 and r.get_json()["skipped"] == "polling is disabled for this site"
    # An explicit poll is always attempted; without Jira credentials it says so.
    r = client.post("/v1/intake/jira-poll", headers=auth("ops"), json={})
    assert r.status_code == 503 and r.get_json()["code"] == "jira_not_configured"
    assert client.post("/v1/intake/jira-poll", headers=auth("n8n"), json={"trigger": "cron"}).status_code == 400


def test_a_refused_run_is_recorded_and_gives_the_ticket_back(client: FlaskClient, database_url: str) -> None:
    body = created_body()
    assert client.post("/v1/intake/jira-webhook", data=body, headers=signed(body)).get_json()["outcome"] == "accepted"
    r = client.post("/v1/intake/refused", headers=auth("n8n"), json={
        "issue_key": "TES-41", "source": "webhook", "external_id": "jira-issue:10040", "status": 403,
        "code": "kill_switch_engaged", "detail": "the kill switch is engaged by ops: incident 7"})
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {"outcome": "refused", "issue_key": "TES-41", "reason": "kill_switch_engaged",
                            "detail": "guardrails answered 403: the kill switch is engaged by ops: incident 7",
                            "released": True, "retry": False}
    listed = client.get("/v1/intake?outcome=refused", headers=auth("ops")).get_json()
    assert [(x["issue_key"], x["reason"], x["detail"]) for x in listed] == \
        [("TES-41", "kill_switch_engaged", "guardrails answered 403: the kill switch is engaged by ops: incident 7")]
    # Nothing was triaged, so the next delivery takes the ticket again (once).
    assert client.post("/v1/intake/jira-webhook", data=body, headers=signed(body)).get_json()["outcome"] == "accepted"
    assert client.post("/v1/intake/jira-webhook", data=body, headers=signed(body)).get_json()["outcome"] == "duplicate"
    # guardrails unreachable: worth a later delivery.
    r = client.post("/v1/intake/refused", headers=auth("n8n"), json={
        "issue_key": "TES-41", "source": "webhook", "code": "guardrails_unreachable"})
    assert r.get_json()["retry"] is True and r.get_json()["released"] is True
    assert r.get_json()["detail"] == "guardrails did not answer: guardrails_unreachable"
    # A second refusal for a ticket without an open claim records it and releases nothing.
    again = client.post("/v1/intake/refused", headers=auth("n8n"), json={
        "issue_key": "TES-41", "source": "poll", "status": 503, "code": "ledger_unavailable"})
    assert again.get_json()["released"] is False and again.get_json()["retry"] is True
    assert [x["outcome"] for x in intake_rows(database_url)] == \
        ["accepted", "refused", "accepted", "duplicate", "refused", "refused"]


@pytest.mark.parametrize("bad", [
    {"source": "webhook", "code": "x"},
    {"issue_key": "nope", "source": "webhook", "code": "x"},
    {"issue_key": "PAY-1", "source": "email", "code": "x"},
    {"issue_key": "PAY-1", "source": "poll"},
    {"issue_key": "PAY-1", "source": "poll", "code": "x", "status": 700},
])
def test_a_malformed_refusal_is_400_and_records_nothing(client: FlaskClient, database_url: str,
                                                        bad: dict[str, Any]) -> None:
    r = client.post("/v1/intake/refused", headers=auth("n8n"), json=bad)
    assert r.status_code == 400 and r.get_json()["errors"]
    assert intake_rows(database_url) == []
    assert client.post("/v1/intake/refused", json={**bad}).status_code == 401
