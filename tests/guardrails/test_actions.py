"""Write proposals against real PostgreSQL and the Jira / Slack emulators: the allowlist decides (naming its
rule), payloads are validated per operation, an idempotency key never executes twice, Jira faults are
recorded and retryable, the kill switch holds every write."""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.guardrails.executors import Limits
from tests.guardrails.actions_support import Writes, make_writes, writes  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
ALLOW_COMMENTS = {"actions": {"rules": [
    {"name": "comments-now", "action": "jira.add_comment", "mode": "allow", "projects": ["SUP"]},
    {"name": "labels-now", "action": "jira.add_labels", "mode": "allow", "labels": ["category-*"]},
]}}


def test_an_allowlisted_write_executes_at_once_and_names_its_rule(writes: Writes) -> None:
    run, key = writes.open_run(), writes.issue()
    r = writes.propose(run, "add_labels", key, {"labels": ["category-leave", "metis-triaged"]}, key="lbl-1")
    assert r.status_code == 201, r.text
    a = r.json()
    assert (a["status"], a["rule"], a["mode"], a["created"]) == ("executed", "triage-labels", "allow", True)
    assert a["result"] == {"labels": ["category-leave", "metis-triaged"], "issue": key}
    assert a["approval_id"] is None and a["attempts"] == 1
    labels = writes.emu.jira_state()["issues"][key]["fields"]["labels"]
    assert set(labels) == {"category-leave", "metis-triaged"}
    assert writes.kinds(a["id"]) == ["action.proposed", "action.executed"]
    proposed = [e for e in writes.audit(kind="action.proposed") if e["data"]["action_id"] == a["id"]][0]
    assert proposed["actor"] == "triage" and proposed["run_id"] == run and proposed["task"] == "triage"
    assert proposed["subject"] == "jira.add_labels" and proposed["data"]["rule"] == "triage-labels"
    # The same key again: the same action, 200, nothing executed again.
    again = writes.propose(run, "add_labels", key, {"labels": ["category-leave", "metis-triaged"]}, key="lbl-1")
    assert again.status_code == 200 and again.json()["id"] == a["id"] and again.json()["created"] is False
    assert writes.kinds(a["id"]) == ["action.proposed", "action.executed"]


def test_an_approve_rule_queues_the_write_for_a_human(writes: Writes) -> None:
    run, key = writes.open_run(), writes.issue()
    r = writes.propose(run, "add_comment", key, {"body": "Set the location time zone.", "internal": True})
    assert r.status_code == 201, r.text
    a = r.json()
    assert (a["status"], a["rule"], a["approval_id"]) == ("pending_approval", "triage-comment", a["id"])
    assert a["expires_at"] and a["summary"]["title"] == f"Add an internal comment to {key}"
    assert a["summary"]["url"] == f"{writes.emu.jira_url}/browse/{key}"
    assert "Set the location time zone." in a["summary"]["preview"]
    # What will be written is stored as ADF, with the line that names the action.
    texts = [n["content"][0]["text"] for n in a["payload"]["body"]["content"]]
    assert texts == ["Set the location time zone.", f"Metis action {a['id']}"]
    assert writes.comments(key) == []
    pending = writes.call("GET", "/v1/actions", caller="ops", params={"status": "pending_approval"}).json()
    assert [x["id"] for x in pending] == [a["id"]]
    assert writes.call("GET", "/v1/actions", caller="ops", params={"status": "executed"}).json() == []
    assert [x["id"] for x in writes.call("GET", "/v1/actions", caller="ops",
                                         params={"target": key, "operation": "add_comment"}).json()] == [a["id"]]
    outbox = writes.sql("SELECT kind, payload FROM guardrails.notify_outbox")
    assert outbox == [{"kind": "approval_request", "payload": {"action_id": a["id"], "action": "jira.add_comment",
                                                               "target": key, "expires_at": a["expires_at"]}}]
    # A proposer may shorten the approval window, never lengthen it.
    short = writes.propose(run, "add_comment", key, {"body": "x"}, expires_in_seconds=60).json()
    long = writes.propose(run, "add_comment", key, {"body": "y"}, expires_in_seconds=10 ** 6).json()
    created = writes.sql("SELECT id::text, extract(epoch FROM expires_at - created_at)::int AS s "
                         "FROM guardrails.actions WHERE id = ANY(%s::uuid[])", [short["id"], long["id"]])
    assert {r["id"]: r["s"] for r in created} == {short["id"]: 60, long["id"]: 86400}


DENIED = [
    ("jira", "delete_issue", "SUP-1", {}, "unknown operation jira.delete_issue"),
    ("salesforce", "update_account", "001", {"x": 1}, "unknown operation salesforce.update_account"),
    ("jira", "add_comment", "OPS-1", {"body": "hi"}, "triage-comment: project OPS not in ['SUP', 'PAY']"),
    ("jira", "add_labels", "SUP-1", {"labels": ["urgent"]}, "label urgent not allowed"),
    ("jira", "add_comment", "SUP-1", {"body": "x" * 4001}, "comment of 4001 characters exceeds 4000"),
    ("jira", "transition", "SUP-1", {"to": "Done"}, "transition to 'Done' not in"),
    ("slack", "post_message", "#ops", {"text": "hello"}, "task 'triage' not in ['digest', 'watch']"),
]


def test_anything_not_allowlisted_is_denied_with_the_reason(writes: Writes) -> None:
    run = writes.open_run()
    for connector, operation, target, payload, why in DENIED:
        r = writes.propose(run, operation, target, payload, connector=connector)
        assert r.status_code == 201, (operation, r.text)
        a = r.json()
        assert (a["status"], a["rule"], a["mode"]) == ("denied", "default:deny", "deny"), operation
        assert why in a["policy_reason"], (why, a["policy_reason"])
        assert writes.kinds(a["id"]) == ["action.denied"]
    assert writes.sql("SELECT count(*) AS n FROM guardrails.notify_outbox") == [{"n": 0}]
    assert writes.emu.jira_state()["comments"] == {}


def test_a_deny_rule_wins_over_a_later_allow_and_is_named(make_writes: Any) -> None:
    w = make_writes({"actions": {"rules": [
        {"name": "no-pay-comments", "action": "jira.add_comment", "mode": "deny", "projects": ["PAY"],
         "description": "payroll tickets are handled by people only"},
        {"name": "comments", "action": "jira.add_comment", "mode": "allow"}]}})
    run = w.open_run()
    a = w.propose(run, "add_comment", "PAY-9", {"body": "hi"}).json()
    assert (a["status"], a["rule"]) == ("denied", "no-pay-comments")
    assert a["policy_reason"] == "rule no-pay-comments denies jira.add_comment: payroll tickets are handled by people only"


INVALID = [
    ("add_comment", "SUP-1", {}, "payload.body"),
    ("add_comment", "SUP-1", {"body": "   "}, "payload.body"),
    ("add_comment", "SUP-1", {"body": {"type": "doc", "version": 1, "content": [{"type": "script"}]}}, "payload.body"),
    ("add_comment", "SUP-1", {"body": {"type": "doc", "version": 1, "content": [{"type": "paragraph", "content": [
        {"type": "text", "text": "x", "marks": [{"type": "link", "attrs": {"href": "javascript:alert(1)"}}]}]}]}},
     "payload.body"),
    ("add_comment", "not a key", {"body": "hi"}, "target"),
    ("add_labels", "SUP-1", {"labels": ["two words"]}, "payload.labels"),
    ("add_labels", "SUP-1", {"labels": []}, "payload.labels"),
    ("link_issues", "SUP-1", {"type": "Dupe", "inward": "SUP-1", "outward": "SUP-2"}, "payload.type"),
    ("link_issues", "SUP-1", {"type": "Duplicate", "inward": "SUP-1", "outward": "SUP-1"}, "payload.outward"),
    ("link_issues", "SUP-3", {"type": "Duplicate", "inward": "SUP-1", "outward": "SUP-2"}, "target"),
    ("transition", "SUP-1", {"transition": "31"}, "payload.to"),
]


def test_an_invalid_payload_is_a_400_naming_the_field_and_nothing_is_queued(writes: Writes) -> None:
    run = writes.open_run()
    for operation, target, payload, field in INVALID:
        r = writes.propose(run, operation, target, payload)
        assert r.status_code == 400, (operation, payload, r.text)
        body = r.json()
        assert r.headers["content-type"] == "application/problem+json" and body["code"] == "invalid_input"
        assert field in body["detail"], (field, body)
    assert writes.sql("SELECT count(*) AS n FROM guardrails.actions") == [{"n": 0}]


def test_envelope_errors_and_refusals(writes: Writes) -> None:
    run = writes.open_run()
    r = writes.call("POST", "/v1/actions", json={"run_id": "x", "connector": "jira"})
    assert r.status_code == 400 and {"run_id", "operation", "target", "payload", "idempotency_key"} <= set(
        r.json()["errors"])
    assert writes.propose(str(uuid.uuid4()), "add_comment", "SUP-1", {"body": "x"}).json()["code"] == "unknown_run"
    assert writes.call("POST", "/v1/actions", caller=None, json={}).status_code == 401
    # The same key for a different write is refused: it would silently drop one of the two.
    writes.propose(run, "add_comment", "SUP-1", {"body": "one"}, key="k-1")
    r = writes.propose(run, "add_comment", "SUP-1", {"body": "two"}, key="k-1")
    assert r.status_code == 409 and r.json()["code"] == "idempotency_key_reused"
    # Keys are per proposer: digest's k-1 is another action.
    other = writes.open_run("digest")
    assert writes.propose(other, "add_comment", "SUP-1", {"body": "two"}, key="k-1", caller="digest").status_code == 201
    spec = writes.call("GET", "/openapi.json").json()
    assert {"/v1/actions", "/v1/actions/{action_id}/decision", "/v1/escalations"} <= set(spec["paths"])
    assert "idempotency_key" in spec["components"]["schemas"]["ActionCreate"]["required"]
    writes.call("POST", f"/v1/runs/{run}/finish", json={"status": "succeeded", "outcome": {}})
    r = writes.propose(run, "add_comment", "SUP-1", {"body": "three"})
    assert r.status_code == 403 and r.json()["code"] == "run_closed"


def test_twenty_identical_proposals_at_once_make_one_action_and_one_jira_write(make_writes: Any) -> None:
    w = make_writes(ALLOW_COMMENTS)
    run, key = w.open_run(), w.issue()
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: w.propose(run, "add_comment", key, {"body": "Once only."}, key="same"),
                                range(20)))
    assert sorted(r.status_code for r in answers) == [200] * 19 + [201]
    assert {r.json()["id"] for r in answers} == {answers[0].json()["id"]}
    assert {r.json()["status"] for r in answers} == {"executed"}
    assert len(w.comments(key)) == 1
    assert w.sql("SELECT count(*) AS n, max(attempts) AS attempts FROM guardrails.actions") == [{"n": 1, "attempts": 1}]
    assert w.kinds(answers[0].json()["id"]) == ["action.proposed", "action.executed"]


def test_jira_429_is_waited_out_as_retry_after_asks(make_writes: Any) -> None:
    w = make_writes(ALLOW_COMMENTS)
    run, key = w.open_run(), w.issue()
    w.emu.jira_fault(f"/rest/api/3/issue/{key}/comment", status=429, retry_after="1", count=1, method="POST")
    t0 = time.monotonic()
    a = w.propose(run, "add_comment", key, {"body": "After the rate limit."}).json()
    assert a["status"] == "executed" and time.monotonic() - t0 >= 1.0
    assert len(w.comments(key)) == 1 and a["result"]["comment_id"] == w.comments(key)[0]["id"]


def test_jira_down_leaves_the_action_failed_visible_and_retryable_once(make_writes: Any) -> None:
    w = make_writes({**ALLOW_COMMENTS, "actions": {**ALLOW_COMMENTS["actions"], "execution": {
        "http_attempts": 2, "request_timeout_seconds": 5, "retry_budget_seconds": 1, "lease_seconds": 20}}})
    run, key = w.open_run(), w.issue()
    w.emu.jira_fault("/rest/api/3/issue/*", status=503, count=None, retry_after="1")
    a = w.propose(run, "add_comment", key, {"body": "While Jira is down."}).json()
    assert a["status"] == "failed" and a["error_retryable"] is True and "503" in a["last_error"]
    assert a["outcome_unknown"] is False and a["decision"] is None
    detail = w.call("GET", f"/v1/actions/{a['id']}", caller="ops").json()
    assert [(h["attempt"], h["outcome"]) for h in detail["history"]] == [(1, "failed")]
    assert w.kinds(a["id"]) == ["action.proposed", "action.failed"]
    alerts = w.call("GET", "/v1/alerts", caller="ops").json()
    assert [x["kind"] for x in alerts] == ["action_failed"] and a["id"] in alerts[0]["payload"]["text"]
    # The same proposal again does not re-run it; only an operator does.
    again = w.propose(run, "add_comment", key, {"body": "While Jira is down."}, key=a["idempotency_key"]).json()
    assert again["status"] == "failed" and again["attempts"] == 1
    assert w.call("POST", f"/v1/actions/{a['id']}/retry", caller="triage",
                  json={"actor": "x", "reason": "y"}).status_code == 403
    w.emu._post(w.emu.jira_url + "/_emulator/reset")  # Jira is back (faults cleared, issues gone): seed again
    key2 = w.emu.jira_seed([{"project": "SUP", "summary": "again"}])[0]
    assert key2 == key
    r = w.call("POST", f"/v1/actions/{a['id']}/retry", caller="ops", json={"actor": "olga", "reason": "Jira is back"})
    assert r.status_code == 200, r.text
    done = r.json()
    assert (done["status"], done["attempts"]) == ("executed", 2) and len(w.comments(key)) == 1
    assert w.kinds(a["id"]) == ["action.proposed", "action.failed", "action.retry_requested", "action.executed"]
    r = w.call("POST", f"/v1/actions/{a['id']}/retry", caller="ops", json={"actor": "olga", "reason": "again"})
    assert r.status_code == 409 and r.json()["code"] == "not_failed"


def test_a_crash_between_the_write_and_its_record_is_recovered_without_writing_again(make_writes: Any) -> None:
    """Attempt 1 wrote the comment, then its worker died before recording it: recovery finds the comment."""
    w = make_writes({**ALLOW_COMMENTS, "actions": {**ALLOW_COMMENTS["actions"], "execution": {
        "http_attempts": 1, "request_timeout_seconds": 2, "retry_budget_seconds": 0, "lease_seconds": 4}}})
    run, key = w.open_run(), w.issue()
    svc = w.svc
    real = svc.executors
    svc.executors = _Crashing(real)
    with pytest.raises(_WorkerDied):  # the worker serving the proposal dies right after Jira took the write
        svc.propose(caller="triage", run_id=uuid.UUID(run), connector="jira", operation="add_comment", target=key,
                    payload={"body": "Exactly once."}, idempotency_key="crash", reason="test")
    svc.executors = real
    assert len(w.comments(key)) == 1
    row = w.sql("SELECT id::text, status, attempts FROM guardrails.actions")[0]
    assert (row["status"], row["attempts"]) == ("executing", 1)
    # A retry inside the lease sees the execution in flight: it neither writes nor steals it.
    svc.wait_seconds = 0.2
    busy = w.propose(run, "add_comment", key, {"body": "Exactly once."}, key="crash")
    svc.wait_seconds = 30.0
    assert busy.status_code == 200 and busy.json()["status"] == "executing"
    time.sleep(4.1)  # the lease (4 s) runs out: the worker is presumed dead
    a = w.propose(run, "add_comment", key, {"body": "Exactly once."}, key="crash").json()
    assert (a["status"], a["attempts"], a["result"]["comment_id"]) == ("executed", 2, w.comments(key)[0]["id"])
    assert len(w.comments(key)) == 1
    detail = w.call("GET", f"/v1/actions/{row['id']}", caller="ops").json()
    assert [(h["attempt"], h["outcome"]) for h in detail["history"]] == [(1, "abandoned"), (2, "reconciled")]
    assert w.kinds(row["id"]) == ["action.proposed", "action.recovered", "action.executed"]
    executed = [e for e in w.audit(kind="action.executed") if e["data"]["action_id"] == row["id"]][0]
    assert executed["data"]["reconciled"] is True


class _WorkerDied(BaseException):
    """Stands for the process dying: nothing in guardrails catches it, so nothing is recorded."""


class _Crashing:
    """The real executors, except that the worker dies once the write has happened."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.jira_url = real.jira_url

    def link_types(self) -> list[str]:
        return list(self.real.link_types())

    def can_reconcile(self, action: Any) -> bool:
        return bool(self.real.can_reconcile(action))

    def execute(self, action: Any, **kwargs: Any) -> Any:
        self.real.execute(action, **kwargs)
        raise _WorkerDied()


def test_the_kill_switch_holds_writes_and_pending_actions_wait(make_writes: Any) -> None:
    w = make_writes()
    run, key = w.open_run(), w.issue()
    a = w.propose(run, "add_comment", key, {"body": "Held."}).json()
    assert a["status"] == "pending_approval"
    w.call("POST", "/v1/kill-switch/engage", caller="ops", json={"actor": "erin", "reason": "incident"})
    try:
        r = w.propose(run, "add_labels", key, {"labels": ["category-leave"]})
        assert r.status_code == 403 and r.json()["code"] == "kill_switch_engaged"
        # A decision is still recorded, but nothing executes while the switch is engaged.
        d = w.decide(a["id"]).json()
        assert d["status"] == "approved" and "kill switch engaged" in d["waiting"]
        w.svc.sweep()  # the background pass executes approved actions, but not while the switch is engaged
        assert w.comments(key) == []
        assert w.call("GET", f"/v1/actions/{a['id']}", caller="ops").json()["status"] == "approved"
    finally:
        w.call("POST", "/v1/kill-switch/release", caller="ops", json={"actor": "erin", "reason": "over"})
    # Released: the next background pass (this one, or any other replica's) executes it, once.
    w.svc.sweep()
    got = w.call("GET", f"/v1/actions/{a['id']}", caller="ops").json()
    assert got["status"] == "executed" and len(w.comments(key)) == 1


def test_the_allowlist_is_validated_with_every_error_named_by_path(writes: Writes) -> None:
    import yaml

    from services.guardrails.policy import PolicyError, build_policy

    policy = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())
    prices = yaml.safe_load((ROOT / "config" / "prices.yaml").read_text())
    policy["actions"] = {
        "execution": {"http_attempts": 4, "request_timeout_seconds": 15, "retry_budget_seconds": 60,
                      "lease_seconds": 30},
        "rules": [
            {"name": "a", "action": "jira.delete_issue", "mode": "allow"},
            {"name": "b", "action": "jira.add_comment", "mode": "sometimes", "transitions": ["Done"]},
            {"name": "b", "action": "jira.add_labels", "mode": "allow", "tasks": ["nobody"], "expires_seconds": 5},
        ]}
    with pytest.raises(PolicyError) as exc:
        build_policy(policy, prices)
    errors = dict(exc.value.errors)
    assert "policy.actions.rules.0.action" in errors and "policy.actions.rules.1.mode" in errors
    assert "policy.actions.execution.lease_seconds" in errors
    # Once the fields are right, cross-checks name what is still wrong.
    policy["actions"]["rules"] = [{"name": "b", "action": "jira.add_comment", "mode": "allow", "transitions": ["x"]}]
    policy["actions"]["execution"]["lease_seconds"] = 300
    with pytest.raises(PolicyError) as exc:
        build_policy(policy, prices)
    assert "does not apply to jira.add_comment" in str(exc.value)
    policy["actions"]["rules"] = [{"name": "b", "action": "jira.add_labels", "mode": "allow", "tasks": ["nobody"]},
                                  {"name": "b", "action": "jira.add_labels", "mode": "deny"}]
    with pytest.raises(PolicyError) as exc:
        build_policy(policy, prices)
    assert "duplicate rule name 'b'" in str(exc.value)
    policy["actions"]["rules"] = [{"name": "b", "action": "jira.add_labels", "mode": "allow", "tasks": ["nobody"]}]
    with pytest.raises(PolicyError) as exc:
        build_policy(policy, prices)
    assert dict(exc.value.errors) == {"policy.actions.rules.0.tasks.0": "unknown task 'nobody'"}
    # The allowlist in force is visible with the rest of the policy.
    shown = writes.call("GET", "/v1/policy", caller="ops").json()["actions"]
    assert [r["name"] for r in shown["rules"]][:2] == ["triage-labels", "triage-comment"]


def test_links_and_transitions_are_executed_after_approval(writes: Writes) -> None:
    run = writes.open_run()
    a_key, b_key = writes.issue(summary="Clock-in late"), writes.issue(summary="Clock-in late (again)")
    link = writes.propose(run, "link_issues", b_key, {"type": "duplicate", "inward": b_key, "outward": a_key}).json()
    assert (link["status"], link["rule"], link["payload"]["type"]) == ("pending_approval", "duplicate-links",
                                                                     "Duplicate")
    done = writes.decide(link["id"]).json()
    assert done["status"] == "executed", done
    assert [(x["type"], x["inward"], x["outward"]) for x in writes.emu.jira_state()["links"]] == [
        ("Duplicate", b_key, a_key)]
    move = writes.propose(run, "transition", a_key, {"to": "In Progress"}).json()
    assert (move["status"], move["rule"]) == ("pending_approval", "support-transitions")
    done = writes.decide(move["id"]).json()
    assert done["status"] == "executed" and done["result"]["status"] == "In Progress"
    assert writes.emu.jira_state()["issues"][a_key]["fields"]["status"]["name"] == "In Progress"


def test_a_write_whose_answer_was_lost_is_not_resent_until_checked(make_writes: Any) -> None:
    w = make_writes(ALLOW_COMMENTS)
    run, key = w.open_run(), w.issue()
    # Jira drops the connection after receiving the request: the write may or may not have happened.
    w.emu.jira_fault(f"/rest/api/3/issue/{key}/comment", method="POST", down=True, count=1)
    a = w.propose(run, "add_comment", key, {"body": "Maybe written."}).json()
    assert (a["status"], a["outcome_unknown"], a["attempts"]) == ("failed", True, 1), a
    assert "may have happened" in a["last_error"] and w.comments(key) == []
    r = w.call("POST", f"/v1/actions/{a['id']}/retry", caller="ops", json={"actor": "olga", "reason": "check"})
    done = r.json()
    # The retry looked for the marker first (not there: the emulator dropped it unapplied), then wrote once.
    assert (done["status"], done["attempts"], done["outcome_unknown"]) == ("executed", 2, False)
    assert len(w.comments(key)) == 1


def test_a_slack_message_of_unknown_outcome_needs_an_operator_to_force_it(make_writes: Any) -> None:
    w = make_writes()
    run = w.open_run("digest")
    ok = w.propose(run, "post_message", "#ops", {"text": "Weekly digest is ready."}, connector="slack",
                   caller="digest").json()
    assert (ok["status"], ok["rule"]) == ("executed", "ops-notices")
    assert [m["text"] for m in w.emu.slack_messages()] == ["Weekly digest is ready."]
    w.emu._post(w.emu.slack_url + "/_emulator/slack/faults", {"path": "/services/*", "down": True, "count": 1})
    lost = w.propose(run, "post_message", "#ops", {"text": "Second notice."}, connector="slack",
                     caller="digest").json()
    assert (lost["status"], lost["outcome_unknown"]) == ("failed", True)
    r = w.call("POST", f"/v1/actions/{lost['id']}/retry", caller="ops", json={"actor": "olga", "reason": "again"})
    assert r.status_code == 409 and r.json()["code"] == "outcome_unknown"  # a Slack post cannot be looked up
    r = w.call("POST", f"/v1/actions/{lost['id']}/retry", caller="ops",
               json={"actor": "olga", "reason": "checked #ops: it is not there", "force": True})
    assert r.json()["status"] == "executed"
    assert [m["text"] for m in w.emu.slack_messages()] == ["Weekly digest is ready.", "Second notice."]


def test_a_quoted_marker_does_not_count_as_the_write(make_writes: Any) -> None:
    """Reconciling looks for the marker as the comment's last line, so ticket text that quotes it is no proof."""
    w = make_writes(ALLOW_COMMENTS)
    run, key = w.open_run(), w.issue()
    w.emu.jira_fault(f"/rest/api/3/issue/{key}/comment", method="POST", down=True, count=1)
    a = w.propose(run, "add_comment", key, {"body": "First try."}).json()
    assert a["outcome_unknown"] is True
    # Someone else's comment quotes the marker line in its middle.
    w.svc.executors.jira(Limits()).add_comment(key, f"Customer wrote:\n\nMetis action {a['id']}\n\nplease look")
    done = w.call("POST", f"/v1/actions/{a['id']}/retry", caller="ops", json={"actor": "o", "reason": "r"}).json()
    assert done["status"] == "executed" and done["result"]["comment_id"] != w.comments(key)[0]["id"]
    assert len(w.comments(key)) == 2
