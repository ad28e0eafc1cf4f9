"""End to end in real n8n: a capped run gets a clean denial (no retry storm), alerts reach Slack + email once,
and the ops form engages the kill switch."""
from __future__ import annotations

import time
import uuid

import psycopg
import pytest
import requests
from psycopg.rows import dict_row

from services.guardrails import repository as repo
from services.guardrails import service
from shared.db import make_pool
from tests.conftest import TEST_TOKENS
from tests.guardrails.conftest import ensure_tool

pytestmark = pytest.mark.xdist_group("n8n")


def _db(stack):
    return psycopg.connect(stack.services.database_url, autocommit=True, row_factory=dict_row)


def _last_error(stack, workflow_id: str) -> str:
    """The error of the workflow's newest execution."""
    execs = stack.n8n.executions(workflow_id)
    if not execs:
        return "no execution"
    result = stack.n8n.execution_run(execs[0]["id"]).get("resultData", {})
    err, last = result.get("error"), result.get("lastNodeExecuted")
    return f"last node {last}: " + str({k: v for k, v in (err or {}).items() if k in ("message", "description",
                                                                                     "node")})[:2000]


def test_workflow_run_hits_its_cap_and_gets_a_clean_denial(stack, emu):
    # The first call really uses its 400 output tokens (~2000 micro-USD of the run's 3000); the second call's
    # worst case no longer fits the run cap.
    emu.script_anthropic([{"output_tokens": 400, "times": 5}])
    r = stack.n8n.webhook("metis-guardrails-e2e-capped", json={"ticket": "PAY-7"}, timeout=60)
    assert r.status_code == 200, (r.text, _last_error(stack, "metisGrE2eCap01"))
    out = r.json()
    assert out["first_status"] == 200
    assert (out["second_status"], out["denial"], out["error_type"]) == (403, "run_cap_exhausted", "permission_error")
    assert out["run_status"] == "cancelled" and 0 < out["spent_micros"] <= 3000
    # No retry storm: Anthropic saw exactly one call; guardrails refused exactly one and reserved nothing after.
    assert len(emu.anthropic_requests("/v1/messages")) == 1
    with _db(stack) as conn:
        kinds = [r["kind"] for r in conn.execute(
            "SELECT kind FROM guardrails.audit_log WHERE run_id = %s ORDER BY seq", (out["run_id"],))]
        assert kinds == ["run.opened", "llm.call", "llm.denied", "run.finished"]
        cap = conn.execute("SELECT * FROM guardrails.caps WHERE key = %s", (f"run:{out['run_id']}",)).fetchone()
        assert cap["reserved_micros"] == 0 and cap["spent_micros"] <= cap["limit_micros"]
    done = stack.n8n.wait_for_execution(workflow_id="metisGrE2eCap01", statuses=("success", "error", "crashed"))
    assert done["status"] == "success"


def test_alerts_reach_slack_and_email_once_with_retries(stack, emu):
    url = f"{stack.n8n.url}/webhook/metis-guardrails-alerts"
    pool = make_pool(stack.services.database_url, max_size=2, name="e2e-alerts")
    pool.open()
    try:
        with pool.connection() as conn, conn.transaction():
            repo.alert_enqueue(conn, dedupe_key=f"test:{uuid.uuid4()}", kind="spend_threshold", severity="warning",
                               payload={"cap": "daily:2026-01-01", "scope": "daily", "task": None,
                                        "period": "2026-01-01", "threshold_percent": 80, "spent_micros": 16_000_000,
                                        "limit_micros": 20_000_000})
        # A wrong token: n8n's header auth refuses, the alert stays queued for a retry.
        failed = service.deliver_alerts(pool, url=url, token="wrong-token-wrong-token", session=requests.Session())
        assert failed == {"sent": 0, "failed": 1}
        assert emu.slack_messages() == []
        with pool.connection() as conn:
            conn.execute("UPDATE guardrails.alert_outbox SET next_attempt_at = now()")
            conn.commit()
        ok = service.deliver_alerts(pool, url=url, token=TEST_TOKENS["n8n"].get(), session=requests.Session())
        assert ok == {"sent": 1, "failed": 0}
        again = service.deliver_alerts(pool, url=url, token=TEST_TOKENS["n8n"].get(), session=requests.Session())
        assert again == {"sent": 0, "failed": 0}
    finally:
        pool.close()
    slack = emu.slack_messages()
    assert len(slack) == 1 and "80% of the daily cap" in str(slack[0])
    mails = emu.wait_for(emu.mail_messages, lambda m: len(m) >= 1)
    assert len(mails) == 1 and "80% of the daily cap" in str(mails[0])


def test_ops_kill_switch_workflow_engages_and_releases(stack):
    """The workflow behind the ops form, through its authenticated webhook twin (same fields, same node)."""
    hook = f"{stack.n8n.url}/webhook/metis-kill-switch-api"
    token = {"Authorization": f"Bearer {TEST_TOKENS['n8n'].get()}"}
    try:
        # n8n may still be activating workflows right after start-up: wait for the path, not a fixed time.
        deadline = time.monotonic() + 20
        while True:
            r = requests.post(hook, json={"action": "engage", "actor": "erin", "reason": "suspicious spend"},
                              headers=token, timeout=30)
            if r.status_code != 404 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, (r.text[:500], _last_error(stack, "metisGrKillSw01"))
        state = stack.services.get("guardrails", "/v1/kill-switch").json()
        assert (state["engaged"], state["actor"], state["reason"]) == (True, "n8n-form:erin", "suspicious spend")
        denied = stack.services.post("guardrails", "/v1/runs", caller="triage",
                                     json={"task": "triage", "trigger": "event"})
        assert denied.status_code == 403 and denied.json()["code"] == "kill_switch_engaged"
        # Without the n8n credential nothing is engaged or released; an unknown action changes nothing.
        anon = requests.post(hook, json={"action": "release", "actor": "x", "reason": "y"}, timeout=30)
        assert anon.status_code in (401, 403)
        bad = requests.post(hook, json={"action": "explode", "actor": "x", "reason": "y"}, headers=token, timeout=30)
        assert bad.status_code >= 400
        assert stack.services.get("guardrails", "/v1/kill-switch").json()["engaged"] is True
        r = requests.post(hook, json={"action": "release", "actor": "erin", "reason": "false alarm"},
                          headers=token, timeout=30)
        assert r.status_code == 200
        assert stack.services.get("guardrails", "/v1/kill-switch").json()["engaged"] is False
    finally:
        stack.services.post("guardrails", "/v1/kill-switch/release", json={"actor": "test", "reason": "cleanup"})


def test_ops_form_in_a_real_browser_engages_the_kill_switch(stack, tmp_path):
    """An ops user logs into n8n, allows the form to run as them, fills it in Chromium: the switch engages."""
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=ensure_tool("chromium"), args=["--no-sandbox"])
            page = browser.new_page()
            # Without a login the form is not even shown.
            page.goto(f"{stack.n8n.url}/form/metis-kill-switch", wait_until="networkidle")
            assert page.query_selector("#field-2") is None
            page.goto(f"{stack.n8n.url}/signin?redirect=%2Fform%2Fmetis-kill-switch", wait_until="networkidle")
            page.fill("input[name=emailOrLdapLoginId]", stack.n8n.owner_email)
            page.fill("input[type=password]", stack.n8n.owner_password.get())
            page.keyboard.press("Enter")
            page.wait_for_url("**/form/metis-kill-switch")
            page.goto(f"{stack.n8n.url}/form/metis-kill-switch", wait_until="networkidle")
            page.get_by_role("button", name="Allow access").click()
            page.wait_for_selector("#field-2")
            page.select_option("#field-0", "engage")
            page.fill("#field-1", "frank")
            page.fill("#field-2", "loop in digest")
            page.get_by_role("button", name="Submit").click()
            deadline = time.monotonic() + 20
            while not stack.services.get("guardrails", "/v1/kill-switch").json()["engaged"]:
                assert time.monotonic() < deadline, _last_error(stack, "metisGrKillSw01")
                time.sleep(0.1)
            page.screenshot(path=str(tmp_path / "kill-switch-form-submitted.png"))
            browser.close()
        state = stack.services.get("guardrails", "/v1/kill-switch").json()
        assert (state["actor"], state["reason"]) == ("n8n-form:frank", "loop in digest")
        audit = stack.services.get("guardrails", "/v1/audit", params={"kind": "kill_switch.engaged"}).json()
        assert audit[-1]["actor"] == "n8n-form:frank" and audit[-1]["data"]["via"] == "n8n"
    finally:
        stack.services.post("guardrails", "/v1/kill-switch/release", json={"actor": "test", "reason": "cleanup"})
