"""Approvals end to end in real n8n and a real Chromium: a proposal reaches Slack and e-mail with the Wait
node's form link, a person opens it in the browser and decides, guardrails writes to Jira exactly once, and
the hash-chained audit shows proposal, decision with the approver, and execution. Also: reject, expiry (n8n's
timeout and a decision that comes too late), an allowlisted write that needs nobody, twenty identical
proposals at once, link unfurlers (plain GETs) changing nothing, and escalations."""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from devstack.n8n import webhook_paths, workflow_files
from devstack.processes import Proc, free_port, start_service
from devstack.stack import n8n_webhook_env, service_env
from tests.conftest import TEST_TOKENS

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("n8n")]

ROOT = Path(__file__).resolve().parents[2]
APPROVAL_WORKFLOW = "metisApproval01"
ESCALATION_WORKFLOW = "metisEscalate01"
SLACK_LINK = re.compile(r"<(https?://[^|>]+)(?:\|[^>]*)?>")
_STACK: list[Any] = []  # for failure messages: what n8n did


def start_notifier(stack: Any, log_dir: Path) -> Proc:
    """A second guardrails replica on the session's database that hands pending actions and escalations to n8n,
    as `make up` and compose configure guardrails (METIS_APPROVAL_WEBHOOK_URL; the session's replica was started
    before n8n had a URL). Tests of the same worker may have recorded other policies on this database:
    config/policy.yaml (whose allowlist these tests rely on) is put back in force, as an operator would."""
    services = stack.services
    env = service_env("guardrails", base=os.environ, database_url=services.database_url, tokens=TEST_TOKENS,
                      urls=services.urls, externals=services.externals, config_dir=str(ROOT / "config"))
    hooks = n8n_webhook_env("guardrails", stack.n8n.url, webhook_paths(workflow_files()))
    env.update({k: hooks[k] for k in ("METIS_APPROVAL_WEBHOOK_URL", "METIS_ESCALATION_WEBHOOK_URL")})
    env.update({"METIS_NOTIFY_POLL_SECONDS": "0.2", "METIS_ACTIONS_SWEEP_SECONDS": "0.5"})
    proc = start_service("guardrails", env=env, port=free_port(), workers=1, log_dir=log_dir)
    r = services.post("guardrails", "/v1/policy/reload", caller="ops")
    assert r.status_code == 200, r.text
    return proc


@pytest.fixture(scope="module")
def notifier(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_notifier(stack, tmp_path_factory.mktemp("guardrails-notifier"))
    _STACK.append(stack)
    yield proc
    _STACK.clear()
    proc.stop()


@pytest.fixture
def clean_db() -> None:
    """Overrides the per-test TRUNCATE for this module: the expiry scenario runs across the module's tests (n8n
    resumes timed-out executions once a minute), so every test filters by its own action, run and ticket."""


@pytest.fixture(scope="module", autouse=True)
def _clean_after_module(database_url: str) -> Iterator[None]:
    yield
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
                            "WHERE schemaname = 'guardrails' AND tablename NOT IN ('schema_migrations', "
                            "'service_info')").fetchall()
        conn.execute("TRUNCATE " + ", ".join(r[0] for r in rows) + " RESTART IDENTITY CASCADE")


@pytest.fixture(scope="module", autouse=True)
def expiring(stack: Any, emulators: Any, notifier: Proc) -> dict[str, Any]:
    """An approval nobody will answer, proposed before the module's other tests: n8n's timer (checked once a
    minute) fires while they run, and the module's last test looks at what happened."""
    t0 = time.monotonic()
    # 3 s: long enough for the hand-off to n8n (the outbox skips actions that expired before it got there).
    r = propose_comment(stack, "SUP-999", "Restart the accrual job.", expires_in_seconds=3)
    assert r.status_code == 201, r.text
    a = r.json()
    slack, mail = request_messages(emulators, a["id"])
    return {"action": a, "slack": slack, "mail": mail, "t0": t0}


# ------------------------------------------------------------------ helpers


def gr(stack: Any, method: str, path: str, caller: str = "triage", **kwargs: Any) -> requests.Response:
    return stack.services.request(method, "guardrails", path, caller=caller, **kwargs)


def open_run(stack: Any) -> str:
    r = gr(stack, "POST", "/v1/runs", json={"task": "triage", "trigger": "manual", "workflow": "e2e-approvals",
                                             "external_id": uuid.uuid4().hex})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def propose_comment(stack: Any, key: str, text: str, **extra: Any) -> requests.Response:
    return gr(stack, "POST", "/v1/actions", json={
        "run_id": extra.pop("run_id", None) or open_run(stack), "connector": "jira", "operation": "add_comment",
        "target": key, "payload": {"body": text, "internal": True}, "reason": "triage suggestion for " + key,
        "idempotency_key": extra.pop("idempotency_key", None) or uuid.uuid4().hex, **extra})


def wait_for(fetch: Callable[[], Any], predicate: Callable[[Any], Any], timeout: float = 20.0,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s; last: {str(value)[:1500]}\n"
                                 + (debug(_STACK[0]) if _STACK else ""))
        time.sleep(0.05)


def slack_about(emu: Any, *parts: str) -> list[dict[str, Any]]:
    """Slack messages that contain every one of `parts`."""
    return [m for m in emu.slack_messages() if all(p in str(m["payload"]) for p in parts)]


def mails_about(emu: Any, ident: str) -> list[dict[str, Any]]:
    return [m for m in emu.mail_messages() if ident in (m["text"] or "")]


def request_messages(emu: Any, ident: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Slack message and the e-mail asking for a decision on `ident`; both must carry the same form link."""
    slack = wait_for(lambda: slack_about(emu, ident), bool, what=f"Slack request for {ident}")[0]
    mail = wait_for(lambda: mails_about(emu, ident), bool, what=f"e-mail for {ident}")[0]
    return slack, mail


def debug(stack: Any) -> str:
    """What the hand-off to n8n looked like (for failure messages)."""
    import psycopg

    with psycopg.connect(stack.services.database_url) as conn:
        outbox = conn.execute("SELECT kind, attempts, delivered_at, last_error FROM guardrails.notify_outbox").fetchall()
    execs = stack.n8n.executions()[:3]
    errors = [f"{e['id']} {e['status']}: {execution_error(stack, e['id'])}" for e in execs]
    return f"outbox: {outbox}\nexecutions: {errors}\nn8n log: {stack.n8n.log(30)}"


def execution_error(stack: Any, execution_id: str) -> str:
    """The last node and error of an n8n execution, and what each node put out."""
    result = stack.n8n.execution_run(execution_id).get("resultData", {})
    err = result.get("error") or {}
    runs = result.get("runData") or {}
    outputs = {name: str([r.get("data", {}).get("main") for r in rs][-1])[:400] for name, rs in runs.items()}
    return f"last node {result.get('lastNodeExecuted')}: " + str(
        {k: v for k, v in err.items() if k in ("message", "description")})[:1500] + f"\noutputs: {outputs}"


def form_link(slack: dict[str, Any]) -> str:
    buttons = [e for b in slack["blocks"] if b["type"] == "actions" for e in b["elements"] if e["type"] == "button"]
    assert len(buttons) == 1
    return str(buttons[0]["url"])


def action(stack: Any, action_id: str) -> dict[str, Any]:
    return dict(gr(stack, "GET", f"/v1/actions/{action_id}", caller="ops").json())


def chain(stack: Any, action_id: str) -> list[tuple[str, str]]:
    entries = gr(stack, "GET", "/v1/audit", caller="ops", params={"kind": "action.*", "limit": 1000}).json()
    return [(e["kind"], e["actor"]) for e in entries if e["data"].get("action_id") == action_id]


def decide_in_browser(browser: Any, url: str, decision: str, email: str, comment: str = "") -> str:
    """Open the form link, choose, submit; returns the page text after submitting."""
    page = browser.new_page()
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#field-0")
        page.select_option("#field-0", decision)
        page.fill("#field-1", email)
        if comment:
            page.fill("#field-2", comment)
        page.get_by_role("button", name="Submit").click()
        page.wait_for_selector("text=Your decision was passed to Metis", timeout=20000)
        return str(page.inner_text("body"))
    finally:
        page.close()


def ready(stack: Any, action_id: str) -> None:
    """Wait until the approval workflow waits on its form (n8n leaves a form request unanswered while the
    execution is still running — between the messages and the Wait node, or after a refused decision)."""
    wait_for(lambda: approval_execution(stack, action_id), lambda e: e["status"] == "waiting",
             what="the approval workflow waiting on its form")


def approval_execution(stack: Any, action_id: str) -> dict[str, Any]:
    requests_ = wait_for(lambda: action(stack, action_id)["approval_requests"], bool, what="approval request recorded")
    assert len(requests_) == 1, requests_
    rows = [e for e in stack.n8n.executions(APPROVAL_WORKFLOW) if e["id"] == requests_[0]["execution_id"]]
    assert rows, requests_
    return rows[0]


# ------------------------------------------------------------------ tests


def test_approve_in_a_real_browser_writes_exactly_one_comment(stack, emu, notifier, browser) -> None:
    key = emu.jira_seed([{"project": "SUP", "summary": "Annual leave balance negative after accrual run"}])[0]
    t0 = time.monotonic()
    r = propose_comment(stack, key, "Re-run the accrual for the affected employees.")
    assert r.status_code == 201 and r.json()["status"] == "pending_approval", r.text
    a = r.json()
    slack, mail = request_messages(emu, a["id"])
    asked = time.monotonic() - t0
    # Both say what will be written where and why, and carry the same form link.
    text = str(slack["payload"])
    for expected in (f"Add an internal comment to {key}", "Re-run the accrual", f"triage suggestion for {key}",
                     "triage-comment"):
        assert expected in text and expected in mail["text"], expected
    link = form_link(slack)
    assert link in mail["links"] and "/form-waiting/" in link and "signature=" in link
    assert mail["to"] == "approvers@example.com" and key in mail["subject"]
    ready(stack, a["id"])

    # Someone who is not an approver cannot approve; the same link stays usable for an approver.
    decide_in_browser(browser, link, "Approve", "mallory@evil.test")
    wait_for(lambda: slack_about(emu, "mallory@evil.test may not decide"), bool, what="not-an-approver notice")
    assert action(stack, a["id"])["status"] == "pending_approval" and emu.jira_state()["comments"][key] == []
    ready(stack, a["id"])

    t1 = time.monotonic()
    page_text = decide_in_browser(browser, link, "Approve", "alice@example.com", "matches the runbook")
    assert "Your decision was passed to Metis" in page_text
    done = wait_for(lambda: action(stack, a["id"]), lambda x: x["status"] == "executed", what="execution")
    decided = time.monotonic() - t1
    comments = emu.jira_state()["comments"][key]
    assert len(comments) == 1 and comments[0]["text"].startswith("Re-run the accrual for the affected employees.")
    assert done["result"]["comment_id"] == comments[0]["id"] and done["approver"] == "alice@example.com"
    assert done["decision_channel"] == "n8n-form" and done["decision_comment"] == "matches the runbook"
    assert chain(stack, a["id"]) == [("action.proposed", "triage"), ("action.approval_requested", "n8n"),
                                     ("action.decided", "alice@example.com"), ("action.executed", "guardrails")]
    assert gr(stack, "GET", "/v1/audit/verify", caller="ops").json()["ok"] is True
    report = wait_for(lambda: slack_about(emu, ":white_check_mark: Approved by alice@example.com", a["id"]), bool,
                      what="outcome in Slack")
    assert len(report) == 1
    wait_for(lambda: approval_execution(stack, a["id"]), lambda e: e["status"] == "success",
             what="approval execution finished")
    # The link is spent: opening it again shows no form, and nothing more is written.
    page = browser.new_page()
    page.goto(link, wait_until="domcontentloaded")
    assert page.query_selector("#field-0") is None
    page.close()
    assert len(emu.jira_state()["comments"][key]) == 1
    print(f"\napproval round trip: request in Slack + e-mail {asked:.2f}s, submit -> executed {decided:.2f}s")


def test_reject_in_a_real_browser_writes_nothing(stack, emu, notifier, browser) -> None:
    key = emu.jira_seed([{"project": "PAY", "summary": "Payslip shows wrong super rate"}])[0]
    a = propose_comment(stack, key, "Change the super rate to 11.5%.").json()
    slack, _ = request_messages(emu, a["id"])
    ready(stack, a["id"])
    decide_in_browser(browser, form_link(slack), "Reject", "bob@example.com", "rate is set by payroll, not us")
    done = wait_for(lambda: action(stack, a["id"]), lambda x: x["status"] == "rejected", what="rejection")
    assert (done["approver"], done["decision_comment"], done["attempts"]) == \
        ("bob@example.com", "rate is set by payroll, not us", 0)
    assert emu.jira_state()["comments"][key] == []
    assert chain(stack, a["id"]) == [("action.proposed", "triage"), ("action.approval_requested", "n8n"),
                                     ("action.decided", "bob@example.com")]
    wait_for(lambda: slack_about(emu, ":no_entry: Rejected by bob@example.com"), bool, what="outcome in Slack")


def test_a_plain_get_of_every_link_in_the_messages_changes_nothing(stack, emu, notifier) -> None:
    key = emu.jira_seed([{"project": "SUP", "summary": "Roster export times out"}])[0]
    a = propose_comment(stack, key, "Split the export by location.").json()
    slack, mail = request_messages(emu, a["id"])
    links = {form_link(slack), *mail["links"], *SLACK_LINK.findall(str(slack["payload"]))}
    assert len(links) >= 2  # the form link, and the ticket
    wait_for(lambda: approval_execution(stack, a["id"]), lambda e: e["status"] == "waiting", what="n8n waiting")
    before = (chain(stack, a["id"]), approval_execution(stack, a["id"])["status"])
    for url in sorted(links):
        # What a link unfurler or a mail scanner does: fetch, follow redirects, maybe twice.
        for _ in range(2):
            requests.get(url, timeout=15, headers={"User-Agent": "Slackbot-LinkExpanding 1.0"})
            requests.head(url, timeout=15)
    assert action(stack, a["id"])["status"] == "pending_approval"
    assert (chain(stack, a["id"]), approval_execution(stack, a["id"])["status"]) == before == (
        [("action.proposed", "triage"), ("action.approval_requested", "n8n")], "waiting")
    assert emu.jira_state()["comments"][key] == []
    assert len(slack_about(emu, a["id"])) == 1  # no outcome was reported: nothing happened


def test_an_allowlisted_write_executes_without_asking(stack, emu, notifier) -> None:
    key = emu.jira_seed([{"project": "SUP", "summary": "Kiosk clock-in one hour late"}])[0]
    r = gr(stack, "POST", "/v1/actions", json={
        "run_id": open_run(stack), "connector": "jira", "operation": "add_labels", "target": key,
        "payload": {"labels": ["category-timesheets", "metis-triaged"]}, "idempotency_key": f"triage:{key}:labels",
        "reason": "category label"})
    assert r.status_code == 201, r.text
    a = r.json()
    assert (a["status"], a["rule"], a["approval_id"]) == ("executed", "triage-labels", None)
    assert set(emu.jira_state()["issues"][key]["fields"]["labels"]) == {"category-timesheets", "metis-triaged"}
    assert chain(stack, a["id"]) == [("action.proposed", "triage"), ("action.executed", "guardrails")]
    assert gr(stack, "GET", "/v1/actions", caller="ops", params={"status": "pending_approval",
                                                                  "run_id": a["run_id"]}).json() == []
    # Nobody was asked: nothing queued for n8n, nothing in Slack or the mailbox about it.
    assert action(stack, a["id"])["approval_requests"] == []
    assert slack_about(emu, key) == [] and mails_about(emu, key) == []


def test_twenty_identical_proposals_at_once_ask_once_and_write_once(stack, emu, notifier, browser) -> None:
    key = emu.jira_seed([{"project": "SUP", "summary": "Timesheet approvals stuck"}])[0]
    run = open_run(stack)
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: propose_comment(stack, key, "Clear the stuck approval queue.", run_id=run,
                                                          idempotency_key=f"triage:{key}:add_comment"), range(20)))
    assert sorted(r.status_code for r in answers) == [200] * 19 + [201], [r.text for r in answers][:3]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1
    aid = ids.pop()
    slack, _ = request_messages(emu, aid)
    ready(stack, aid)
    decide_in_browser(browser, form_link(slack), "Approve", "carol@example.com")
    wait_for(lambda: action(stack, aid), lambda x: x["status"] == "executed", what="execution")
    wait_for(lambda: slack_about(emu, ":white_check_mark:", aid), bool, what="outcome in Slack")
    assert len(emu.jira_state()["comments"][key]) == 1
    mails = wait_for(lambda: mails_about(emu, aid), lambda m: len(m) >= 2, what="outcome e-mail")
    assert len(slack_about(emu, "Approval needed", aid)) == 1 and len(mails) == 2  # one request, one outcome
    listed = gr(stack, "GET", "/v1/actions", caller="ops", params={"run_id": run}).json()
    assert [x["id"] for x in listed] == [aid]


def test_a_decision_after_the_deadline_is_refused_and_reported(stack, emu, notifier, browser) -> None:
    key = emu.jira_seed([{"project": "SUP", "summary": "Award rule change for weekend rates"}])[0]
    a = propose_comment(stack, key, "Apply the new weekend penalty rate.", expires_in_seconds=3).json()
    slack, _ = request_messages(emu, a["id"])
    ready(stack, a["id"])
    # guardrails owns the deadline: its sweeper expires the action at expires_at ...
    wait_for(lambda: action(stack, a["id"]), lambda x: x["status"] == "expired", timeout=15, what="expiry")
    # ... while n8n still shows the form for a few seconds longer, so a decision at the deadline reaches guardrails.
    decide_in_browser(browser, form_link(slack), "Approve", "alice@example.com")
    wait_for(lambda: slack_about(emu, ":hourglass: Expired", a["id"]), bool, what="expiry reported")
    assert emu.jira_state()["comments"][key] == []
    assert [k for k, _ in chain(stack, a["id"])] == ["action.proposed", "action.approval_requested", "action.expired"]


def test_an_escalation_is_announced_and_closed_from_the_form(stack, emu, notifier, browser) -> None:
    key = emu.jira_seed([{"project": "SUP", "summary": "Customer asks us to delete all timesheets"}])[0]
    r = gr(stack, "POST", "/v1/escalations", json={
        "run_id": open_run(stack), "subject": key, "reason": "the ticket asks for a destructive change",
        "context": {"ticket_key": key, "summary": "Customer asks us to delete all timesheets"}})
    assert r.status_code == 201, r.text
    e = r.json()
    slack = wait_for(lambda: slack_about(emu, e["id"]), bool, what="escalation in Slack")[0]
    mail = wait_for(lambda: [m for m in emu.mail_messages() if e["id"] in (m["text"] or "")], bool,
                    what="escalation e-mail")[0]
    assert "the ticket asks for a destructive change" in str(slack["payload"]) and key in mail["subject"]
    link = form_link(slack)
    assert link in mail["links"]
    wait_for(lambda: stack.n8n.executions(ESCALATION_WORKFLOW), lambda rows: rows and rows[0]["status"] == "waiting",
             what="the escalation workflow waiting on its form")
    page = browser.new_page()
    page.goto(link, wait_until="domcontentloaded")
    page.wait_for_selector("#field-0")
    page.select_option("#field-0", "Resolved")
    page.fill("#field-1", "dana@example.com")
    page.fill("#field-2", "told the customer we do not delete records")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_selector("text=The escalation is closed")
    page.close()
    done = wait_for(lambda: gr(stack, "GET", f"/v1/escalations/{e['id']}", caller="ops").json(),
                    lambda x: x["status"] == "resolved", what="resolution")
    assert (done["resolution"], done["resolved_by"]) == ("resolved", "dana@example.com")
    wait_for(lambda: slack_about(emu, "resolved by dana@example.com"), bool, what="resolution in Slack")
    assert emu.jira_state()["comments"][key] == []  # an escalation never writes to the target system
    assert gr(stack, "GET", "/v1/actions", caller="ops", params={"run_id": e["run_id"]}).json() == []


def test_nobody_decides_and_n8n_reports_the_expiry(stack, expiring, browser) -> None:
    """Proposed when the module started with a 3 s window: guardrails expired it when the window closed, and
    n8n's timer (it checks waiting executions once a minute) resumed the workflow, which reported the expiry."""
    a = expiring["action"]
    execution = wait_for(lambda: approval_execution(stack, a["id"]), lambda e: e["status"] == "success", timeout=90,
                         what="the approval workflow's timeout")
    waited = time.monotonic() - expiring["t0"]
    print(f"\nexpiry reported by n8n {waited:.1f}s after the proposal (3 s window)")
    runs = n8n_outputs(stack, execution["id"])
    assert "Record the decision" not in runs and runs["Expire"]["statusCode"] == 200
    assert runs["Outcome"]["line"].startswith(":hourglass: Expired")
    assert runs["Report to Slack"] == {"data": "ok"} and runs["Report by e-mail"]["accepted"] == ["approvers@example.com"]
    done = action(stack, a["id"])
    assert done["status"] == "expired" and done["attempts"] == 0
    assert [k for k, _ in chain(stack, a["id"])] == ["action.proposed", "action.approval_requested", "action.expired"]
    page = browser.new_page()
    page.goto(form_link(expiring["slack"]), wait_until="domcontentloaded")
    assert page.query_selector("#field-0") is None  # the form is gone
    page.close()


def n8n_outputs(stack: Any, execution_id: str) -> dict[str, Any]:
    """The first output item of every node that ran in an n8n execution."""
    runs = stack.n8n.execution_run(execution_id).get("resultData", {}).get("runData") or {}
    out: dict[str, Any] = {}
    for name, r in runs.items():
        branches = [items for items in (r[-1].get("data") or {}).get("main") or [] if items]
        if branches:
            out[name] = branches[0][0]["json"]
    return out
