"""One triaged ticket all the way to Jira, in real n8n, real gunicorn services and a real Chromium: the Jira
emulator signs a `jira:issue_created` webhook → the n8n triage flow (verify, claim, open run, triage) → triage
proposes the internal comment and labels through guardrails `/v1/actions` → labels are allowlisted and written,
the comment waits: guardrails hands it to the `approval-request` workflow, which asks in Slack and by e-mail →
an approver opens the link in Chromium and decides → guardrails writes exactly one comment on that ticket (or,
rejected, none), and the audit chain shows proposed → approval requested → decided → executed."""
from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from devstack.processes import Proc
from tests.e2e.test_approvals_n8n import (action, approval_execution, chain, decide_in_browser,
                                          form_link, gr, ready, request_messages, slack_about, start_notifier,
                                          wait_for)

from .conftest import seed_history

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("n8n"), pytest.mark.usefixtures("quiet_n8n")]

HOOK = "metis-triage-jira"


@pytest.fixture(scope="module")
def notifier(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """guardrails handing triage's pending comments to n8n, as `make up` and compose configure it."""
    proc = start_notifier(stack, tmp_path_factory.mktemp("guardrails-triage-notifier"))
    yield proc
    proc.stop()


def _triaged_ticket(stack: Any, emu: Any, summary: str) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """Seed a ticket whose creation Jira announces by a signed webhook; wait for the triage run to finish.
    Returns the key, the run and its actions by operation."""
    services = stack.services
    seed_history(services)
    emu.jira_register_webhook(f"{stack.n8n.url}/webhook/{HOOK}", events=["jira:issue_created"])
    key = emu.jira_seed([{"project": "SUP", "summary": summary, "issuetype": "Bug",
                          "description": "30 employees show negative balances since last night."}],
                        fire_webhooks=True)[0]
    external_id = f"jira-issue:{emu.jira_state()['issues'][key]['id']}"

    def finished() -> list[dict[str, Any]]:
        runs = gr(stack, "GET", "/v1/runs", caller="ops", params={"task": "triage", "limit": 1000}).json()
        return [r for r in runs if r["external_id"] == external_id and r["status"] != "open"]

    runs = wait_for(finished, bool, timeout=60, what=f"the triage run of {key}")
    assert [r["status"] for r in runs] == ["succeeded"], runs
    actions = gr(stack, "GET", "/v1/actions", caller="ops", params={"run_id": runs[0]["id"]}).json()
    assert sorted((a["operation"], a["target"], a["status"], a["rule"]) for a in actions) == [
        ("add_comment", key, "pending_approval", "triage-comment"), ("add_labels", key, "executed", "triage-labels")]
    return key, runs[0], {a["operation"]: a for a in actions}


def test_a_triaged_ticket_approved_in_the_browser_gets_exactly_one_comment(stack, emu, notifier, browser) -> None:
    t0 = time.monotonic()
    key, run, actions = _triaged_ticket(stack, emu, "Annual leave balance negative after accrual run")
    comment = actions["add_comment"]
    # The allowlisted labels are already on the ticket; the comment is not, until someone approves it.
    assert {"category-leave", "metis-triaged"} <= set(emu.jira_state()["issues"][key]["fields"]["labels"])
    assert emu.jira_state()["comments"][key] == []
    assert chain(stack, actions["add_labels"]["id"]) == [("action.proposed", "triage"),
                                                         ("action.executed", "guardrails")]

    slack, mail = request_messages(emu, comment["id"])
    asked = time.monotonic() - t0
    text = str(slack["payload"])
    for expected in (f"Add an internal comment to {key}", "Category: leave", "Reverted the doubled accrual run",
                     f"triage (offline) of {key}: suggested resolution"):
        assert expected in text and expected in mail["text"], expected
    link = form_link(slack)
    assert link in mail["links"] and key in mail["subject"]
    ready(stack, comment["id"])
    page = decide_in_browser(browser, link, "Approve", "alice@example.com", "matches the runbook")
    assert "Your decision was passed to Metis" in page

    done = wait_for(lambda: action(stack, comment["id"]), lambda a: a["status"] == "executed", what="execution")
    state = emu.jira_state()
    written = state["comments"][key]
    assert len(written) == 1 and done["result"]["comment_id"] == written[0]["id"]
    body = written[0]["text"]
    # The triage of the triggering ticket: its category and the neighbours' resolution, and guardrails' marker.
    for expected in ("Category: leave", "Priority: Critical", "Component: leave-engine", "(offline mode)",
                     "Suggested resolution:", "Reverted the doubled accrual run.", "HIST-"):
        assert expected in body, (expected, body)
    assert body.rstrip().endswith(f"Metis action {comment['id']}")
    assert [k for k, cs in state["comments"].items() if cs] == [key]  # no other ticket was touched
    assert (done["approver"], done["decision_channel"], done["run_id"]) == ("alice@example.com", "n8n-form", run["id"])
    assert chain(stack, comment["id"]) == [("action.proposed", "triage"), ("action.approval_requested", "n8n"),
                                           ("action.decided", "alice@example.com"), ("action.executed", "guardrails")]
    assert gr(stack, "GET", "/v1/audit/verify", caller="ops").json()["ok"] is True
    wait_for(lambda: slack_about(emu, ":white_check_mark: Approved by alice@example.com", comment["id"]), bool,
             what="outcome in Slack")
    wait_for(lambda: approval_execution(stack, comment["id"]), lambda e: e["status"] == "success",
             what="approval workflow finished")
    assert len(emu.jira_state()["comments"][key]) == 1
    print(f"\ntriage webhook -> approval request in Slack + e-mail: {asked:.2f}s")


def test_a_triaged_ticket_rejected_in_the_browser_gets_no_comment(stack, emu, notifier, browser) -> None:
    key, _, actions = _triaged_ticket(stack, emu, "Annual leave balances negative for part-timers after accrual")
    comment = actions["add_comment"]
    slack, _ = request_messages(emu, comment["id"])
    ready(stack, comment["id"])
    decide_in_browser(browser, form_link(slack), "Reject", "bob@example.com", "payroll already fixed it")
    done = wait_for(lambda: action(stack, comment["id"]), lambda a: a["status"] == "rejected", what="rejection")
    assert (done["approver"], done["decision_comment"], done["attempts"]) == \
        ("bob@example.com", "payroll already fixed it", 0)
    wait_for(lambda: slack_about(emu, ":no_entry: Rejected by bob@example.com", comment["id"]), bool,
             what="outcome in Slack")
    wait_for(lambda: approval_execution(stack, comment["id"]), lambda e: e["status"] == "success",
             what="approval workflow finished")
    state = emu.jira_state()
    assert state["comments"][key] == []
    assert "category-leave" in state["issues"][key]["fields"]["labels"]  # the allowlisted labels stay
    assert chain(stack, comment["id"]) == [("action.proposed", "triage"), ("action.approval_requested", "n8n"),
                                           ("action.decided", "bob@example.com")]
