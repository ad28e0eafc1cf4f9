"""`make up`'s demo wiring: a ticket created in the Jira emulator reaches both Jira flows in real n8n, signed."""
from __future__ import annotations

import time
from typing import Any

import requests

from devstack import demo
from devstack.n8n import webhook_paths, workflow_files


def _finished_runs(services: Any, task: str) -> list[dict[str, Any]]:
    runs = services.get("guardrails", f"/v1/runs?task={task}&limit=100", caller="ops").json()
    return [r for r in runs if r["status"] != "open"]


def test_the_jira_flows_it_wires_exist_as_workflow_webhooks():
    assert set(demo.JIRA_FLOW_WEBHOOKS) <= webhook_paths(workflow_files())


def test_a_ticket_created_in_jira_is_triaged_and_checked_for_duplicates(stack, emu):
    try:
        _create_and_follow(stack, emu)
    finally:  # tests that use the session's emulators without resetting them must not feed n8n
        requests.delete(emu.jira_url + "/_emulator/jira/webhooks", timeout=10).raise_for_status()


def _create_and_follow(stack: Any, emu: Any) -> None:
    services, n8n = stack.services, stack.n8n
    line = demo.wire_jira_webhooks(emu.jira_url, n8n.url)
    assert "/webhook/metis-triage-jira" in line and "/webhook/metis-dedupe-jira" in line
    hooks = requests.get(emu.jira_url + "/_emulator/jira/webhooks", timeout=10).json()["webhooks"]
    assert sorted(h["url"] for h in hooks) == sorted(f"{n8n.url}/webhook/{p}" for p in demo.JIRA_FLOW_WEBHOOKS)
    assert all(h["signed"] and h["events"] == ["jira:issue_created"] for h in hooks)

    # What a person does: create a defect through Jira's REST API.
    r = requests.post(emu.jira_url + "/rest/api/3/issue", auth=emu.jira_auth, timeout=10, json={"fields": {
        "project": {"key": "SUP"}, "issuetype": {"name": "Bug"},
        "summary": "Payslip PDF shows last month's net pay after the award rate change",
        "description": {"type": "doc", "version": 1, "content": [{"type": "paragraph", "content": [
            {"type": "text", "text": "Casual staff payslips show the previous month's net pay."}]}]}}})
    assert r.status_code == 201, r.text
    key = r.json()["key"]

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        triage, dedupe = _finished_runs(services, "triage"), _finished_runs(services, "dedupe")
        if triage and dedupe:
            break
        time.sleep(0.5)
    assert [(r["status"], r["trigger"]) for r in triage] == [("succeeded", "event")], triage
    assert [(r["status"], r["trigger"]) for r in dedupe] == [("succeeded", "event")], dedupe
    deliveries = requests.get(emu.jira_url + "/_emulator/jira/webhooks", timeout=10).json()["deliveries"]
    assert sorted((d["url"].rsplit("/", 1)[-1], d["status"]) for d in deliveries) == [
        ("metis-dedupe-jira", "delivered"), ("metis-triage-jira", "delivered")]
    assert key.startswith("SUP-")
