"""Approvals and escalations over real HTTP and PostgreSQL: decisions from n8n's token only, once, before the
deadline; approved writes executed and audited with the approver; the n8n outbox; escalations never write."""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
import requests

from devstack.processes import free_port
from tests.conftest import TEST_TOKENS
from tests.guardrails.actions_support import Writes, make_writes, writes  # noqa: F401 (fixtures)


def _pending(w: Writes, key: str, body: str = "Please re-run the accrual.", **extra: Any) -> dict[str, Any]:
    r = w.propose(w.open_run(), "add_comment", key, {"body": body}, **extra)
    assert r.status_code == 201 and r.json()["status"] == "pending_approval", r.text
    return dict(r.json())


def test_approval_executes_once_and_the_audit_names_the_approver(writes: Writes) -> None:
    key = writes.issue()
    a = _pending(writes, key)
    r = writes.decide(a["id"], "approve", "alice@example.com", comment="looks right",
                      headers={"X-N8N-Execution-Id": "4711"})
    assert r.status_code == 200, r.text
    done = r.json()
    assert (done["status"], done["decision"], done["approver"], done["decision_comment"]) == \
        ("executed", "approve", "alice@example.com", "looks right")
    comments = writes.comments(key)
    assert len(comments) == 1 and comments[0]["text"].startswith("Please re-run the accrual.")
    assert f"Metis action {a['id']}" in comments[0]["text"] and done["result"]["comment_id"] == comments[0]["id"]
    chain = [e for e in writes.audit(kind="action.*") if e["data"].get("action_id") == a["id"]]
    assert [(e["kind"], e["actor"]) for e in chain] == [
        ("action.proposed", "triage"), ("action.decided", "alice@example.com"), ("action.executed", "guardrails")]
    assert chain[1]["data"]["via"] == "n8n" and chain[1]["data"]["n8n_execution_id"] == "4711"
    assert writes.call("GET", "/v1/audit/verify", caller="ops").json()["ok"] is True
    # Deciding again, either way, is a conflict that shows the state; nothing is written again.
    for decision in ("approve", "reject"):
        again = writes.decide(a["id"], decision, "bob@example.com")
        assert again.status_code == 409 and again.json()["code"] == "already_decided"
        assert again.json()["action"]["status"] == "executed"
    assert len(writes.comments(key)) == 1


def test_rejection_writes_nothing(writes: Writes) -> None:
    key = writes.issue()
    a = _pending(writes, key)
    done = writes.decide(a["id"], "reject", "carol@example.com", comment="wrong ticket").json()
    assert (done["status"], done["approver"]) == ("rejected", "carol@example.com")
    assert writes.comments(key) == [] and done["attempts"] == 0
    assert writes.kinds(a["id"]) == ["action.proposed", "action.decided"]
    r = writes.decide(a["id"], "approve")
    assert r.status_code == 409 and r.json()["code"] == "already_decided"


def test_decision_errors(writes: Writes) -> None:
    a = _pending(writes, writes.issue())
    r = writes.decide(str(uuid.uuid4()))
    assert r.status_code == 404 and r.json()["code"] == "unknown_action"
    r = writes.call("POST", f"/v1/actions/{a['id']}/decision", caller="n8n", json={"decision": "approve"})
    assert r.status_code == 400 and "approver" in r.json()["errors"]
    r = writes.decide(a["id"], approver="   ")
    assert r.status_code == 400 and "approver" in r.json()["errors"]
    r = writes.decide(a["id"], decision="maybe")
    assert r.status_code == 400 and "decision" in r.json()["errors"]
    # Only n8n relays decisions: not the proposing service, not ops' token.
    for caller in ("triage", "ops"):
        assert writes.decide(a["id"], caller=caller).status_code == 403
    r = writes.decide(a["id"], approver="mallory@evil.test")
    assert r.status_code == 403 and r.json()["code"] == "approver_not_allowed"
    assert writes.call("GET", f"/v1/actions/{a['id']}").json()["status"] == "pending_approval"
    denied = writes.propose(writes.open_run(), "add_comment", "OPS-1", {"body": "x"}).json()
    r = writes.decide(denied["id"])
    assert r.status_code == 409 and r.json()["code"] == "not_pending"


def test_a_decision_after_the_deadline_is_a_409_and_the_action_expires(writes: Writes) -> None:
    key = writes.issue()
    a = _pending(writes, key)
    # The deadline passes; the decision arrives before any sweeper has looked (they run every few seconds).
    writes.sql("UPDATE guardrails.actions SET expires_at = now() - interval '1 millisecond' WHERE id = %s", a["id"])
    r = writes.decide(a["id"], "approve", "alice@example.com")
    assert r.status_code == 409 and r.json()["code"] == "approval_expired"
    assert r.json()["action"]["status"] == "expired"
    assert writes.comments(key) == []
    expired = [e for e in writes.audit(kind="action.expired") if e["data"]["action_id"] == a["id"]]
    assert len(expired) == 1 and expired[0]["data"]["late_decision"]["by"] == "alice@example.com"
    assert writes.decide(a["id"]).json()["code"] == "approval_expired"


def test_n8n_expires_on_its_timeout_and_the_sweeper_expires_what_nobody_answered(writes: Writes) -> None:
    a = _pending(writes, writes.issue())
    r = writes.call("POST", f"/v1/actions/{a['id']}/expire", caller="n8n", json={"actor": "n8n:approval-timeout"})
    assert r.status_code == 200 and (r.json()["status"], r.json()["changed"]) == ("expired", True)
    again = writes.call("POST", f"/v1/actions/{a['id']}/expire", caller="n8n", json={})
    assert again.status_code == 200 and again.json()["changed"] is False
    assert writes.call("POST", f"/v1/actions/{a['id']}/expire", caller="triage", json={}).status_code == 403
    assert writes.kinds(a["id"]) == ["action.proposed", "action.expired"]
    decided = _pending(writes, writes.issue())
    writes.decide(decided["id"], "reject")
    r = writes.call("POST", f"/v1/actions/{decided['id']}/expire", caller="n8n", json={})
    assert r.status_code == 409 and r.json()["code"] == "already_decided"
    # Nobody answered (n8n down, or its timer late): guardrails' own sweeper expires it at the deadline.
    late = _pending(writes, writes.issue(), expires_in_seconds=1)
    time.sleep(1.1)
    writes.svc.sweep()  # (or another replica's sweeper on this database: one of them expires it, once)
    assert writes.call("GET", f"/v1/actions/{late['id']}").json()["status"] == "expired"
    assert writes.kinds(late["id"]) == ["action.proposed", "action.expired"]


def test_approval_requests_are_recorded_and_listed(writes: Writes) -> None:
    a = _pending(writes, writes.issue())
    body = {"execution_id": "812", "channels": ["slack", "email"]}
    r = writes.call("POST", f"/v1/actions/{a['id']}/approval-request", caller="n8n", json=body)
    assert r.status_code == 200 and r.json()["approval_requests"][0]["execution_id"] == "812"
    writes.call("POST", f"/v1/actions/{a['id']}/approval-request", caller="n8n", json=body)  # n8n retry: once
    assert writes.kinds(a["id"]) == ["action.proposed", "action.approval_requested"]
    writes.decide(a["id"], "reject")
    r = writes.call("POST", f"/v1/actions/{a['id']}/approval-request", caller="n8n", json={"execution_id": "813"})
    assert r.status_code == 409 and r.json()["code"] == "not_pending"


class _Receiver:
    """A real HTTP endpoint standing where n8n's approval webhook is: records requests, answers `status`."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/webhook/metis-approval-request"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver()
    yield r
    r.server.shutdown()


def test_pending_actions_are_handed_to_n8n_once_with_retries(writes: Writes, receiver: _Receiver) -> None:
    a = _pending(writes, writes.issue())
    gone = _pending(writes, writes.issue())
    writes.decide(gone["id"], "reject")  # decided before n8n was told: nobody needs to be asked
    token, session = TEST_TOKENS["n8n"].get(), requests.Session()
    receiver.status = 503
    assert writes.svc.deliver(kind="approval_request", url=receiver.url, token=token, session=session) == \
        {"sent": 0, "failed": 1, "skipped": 1}
    writes.sql("UPDATE guardrails.notify_outbox SET next_attempt_at = now()")
    receiver.status = 200
    assert writes.svc.deliver(kind="approval_request", url=receiver.url, token=token, session=session) == \
        {"sent": 1, "failed": 0, "skipped": 0}
    assert writes.svc.deliver(kind="approval_request", url=receiver.url, token=token, session=session) == \
        {"sent": 0, "failed": 0, "skipped": 0}
    headers, body = receiver.requests[-1]
    assert headers["authorization"] == f"Bearer {token}" and headers["idempotency-key"] == f"approval:{a['id']}"
    assert body == {"kind": "approval_request", "action_id": a["id"], "action": "jira.add_comment",
                    "target": a["target"], "expires_at": a["expires_at"]}
    assert len(receiver.requests) == 2


def test_escalations_are_queued_listed_resolved_and_never_write(writes: Writes) -> None:
    run, key = writes.open_run(), writes.issue()
    body = {"run_id": run, "reason": "confidence 0.41 below 0.6", "subject": key,
            "context": {"ticket_key": key, "suggestion": {"category": "leave"}}}
    r = writes.call("POST", "/v1/escalations", json=body)
    assert r.status_code == 201, r.text
    e = r.json()
    assert (e["status"], e["subject"], e["task"], e["caller"], e["created"]) == ("open", key, "triage", "triage", True)
    again = writes.call("POST", "/v1/escalations", json=body)
    assert again.status_code == 200 and again.json()["id"] == e["id"] and again.json()["created"] is False
    assert [x["id"] for x in writes.call("GET", "/v1/escalations", params={"status": "open"}).json()] == [e["id"]]
    assert writes.sql("SELECT kind, payload FROM guardrails.notify_outbox") == [
        {"kind": "escalation", "payload": {"escalation_id": e["id"]}}]
    # Escalating writes nothing to Jira, proposes nothing.
    assert writes.comments(key) == [] and writes.sql("SELECT count(*) AS n FROM guardrails.actions") == [{"n": 0}]
    assert writes.call("POST", f"/v1/escalations/{e['id']}/resolve", caller="triage",
                       json={"actor": "x"}).status_code == 403
    r = writes.call("POST", f"/v1/escalations/{e['id']}/resolve", caller="n8n",
                    json={"actor": "dana@example.com", "resolution": "resolved", "comment": "answered the customer"})
    assert r.status_code == 200 and (r.json()["status"], r.json()["resolved_by"]) == ("resolved", "dana@example.com")
    r = writes.call("POST", f"/v1/escalations/{e['id']}/resolve", caller="ops", json={"actor": "olga"})
    assert r.status_code == 409 and r.json()["code"] == "already_resolved"
    assert writes.call("GET", "/v1/escalations", params={"status": "open"}).json() == []
    kinds = [(x["kind"], x["actor"]) for x in writes.audit(kind="escalation.*")]
    assert kinds == [("escalation.filed", "triage"), ("escalation.resolved", "dana@example.com")]
    r = writes.call("POST", "/v1/escalations", json={**body, "run_id": str(uuid.uuid4())})
    assert r.status_code == 404 and r.json()["code"] == "unknown_run"
    r = writes.call("POST", "/v1/escalations", json={"run_id": run, "subject": " "})
    assert r.status_code == 400 and {"reason", "subject"} <= set(r.json()["errors"])
    assert writes.call("GET", f"/v1/escalations/{uuid.uuid4()}").status_code == 404


def test_ops_can_see_pending_approvals_and_failures_in_metrics(writes: Writes) -> None:
    _pending(writes, writes.issue())
    run = writes.open_run()
    writes.call("POST", "/v1/escalations", json={"run_id": run, "reason": "unsure", "subject": "SUP-9"})
    text = writes.call("GET", "/metrics", caller=None).text
    assert 'metis_guardrails_actions{status="pending_approval"} 1.0' in text
    assert 'metis_guardrails_actions{status="executed"} 0.0' in text
    assert "metis_guardrails_escalations_open 1.0" in text
    assert "metis_guardrails_notify_undelivered 2.0" in text
    age = float(re.search(r"^metis_guardrails_oldest_pending_approval_seconds (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert 0 <= age < 60
