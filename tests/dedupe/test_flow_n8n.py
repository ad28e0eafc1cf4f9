"""The duplicate flow in real n8n: Jira emulator → signed webhook → n8n → dedupe intake → guardrails run →
duplicate check → proposals through guardrails → (approval) → Jira; plus the static checks of the workflow file."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import free_port, start_service
from devstack.stack import service_env
from services.dedupe.config import copy_with_llm_enabled
from shared.connectors.adf import adf_to_text
from tests.conftest import TEST_TOKENS
from tests.fixtures.n8n import start_n8n
from tests.fixtures.waiting import wait_until

HOOK = "metis-dedupe-jira"
WORKFLOW = "metisDedupeJira1"
APPROVER = "lead@example.com"
ROOT = Path(__file__).resolve().parents[2]

OLD = {"project": "SUP", "summary": "Annual leave balance negative after the nightly accrual run",
       "description": "Employees show negative leave balances after the accrual job ran twice overnight.",
       "issuetype": "Bug", "created": "2025-01-06T09:00:00.000+0000"}
UNRELATED = {"project": "SUP", "summary": "Export of timesheets to CSV drops the last row",
             "description": "The CSV export of approved timesheets omits the final line of the file.",
             "issuetype": "Bug", "created": "2025-01-07T09:00:00.000+0000"}

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("n8n")]


# ------------------------------------------------------------------ helpers


def _quiet(n8n: Any) -> None:
    """Wait until this workflow's executions have ended, so none writes into the next test."""
    deadline = time.monotonic() + 90
    busy: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        busy = [e for e in n8n.executions(WORKFLOW) if e["status"] not in ("success", "error", "crashed", "canceled")]
        if not busy:
            return
        time.sleep(0.2)
    raise AssertionError(f"n8n executions still running after the test: {busy}")


def _policy_and_model_ready(services: Any, dedupe_url: str) -> None:
    # Other tests on this worker may have put another policy in force: config/policy.yaml's allowlist applies here.
    r = services.post("guardrails", "/v1/policy/reload", caller="ops")
    assert r.status_code == 200, r.text
    _wait(lambda: requests.get(dedupe_url + "/readyz", timeout=10).status_code == 200, timeout=180)


@pytest.fixture
def flow(stack: Any) -> Iterator[Any]:
    """The session's stack (dedupe offline, as configured in config/dedupe.yaml)."""
    _policy_and_model_ready(stack.services, stack.services.url("dedupe"))
    yield stack
    _quiet(stack.n8n)


@pytest.fixture
def llm_site(stack: Any, emulators: Any, worker_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A site with dedupe's LLM verification on (config llm.enabled, METIS_DEDUPE_LLM=on): a dedupe replica on the
    session's database calling the session's guardrails gateway with its own token, and an n8n of its own with
    every workflow, whose METIS_DEDUPE_URL is that replica. A "duplicate" verdict is the model's confirmation
    of the offline search (config/dedupe.yaml: the offline verdict alone is not precise enough to link)."""
    services = stack.services
    work = tmp_path_factory.mktemp("dedupe-llm")
    config = copy_with_llm_enabled(ROOT / "config", work / "config")
    env = service_env("dedupe", base=os.environ, database_url=services.database_url, tokens=TEST_TOKENS,
                      urls=services.urls, externals=services.externals, config_dir=str(config))
    env.update({"METIS_DEDUPE_LLM": "on", "METIS_DB_POOL_MAX": "4"})
    dedupe = start_service("dedupe", env=env, port=free_port(), workers=1, log_dir=work)
    try:
        view = dataclasses.replace(services, urls={**services.urls, "METIS_DEDUPE_URL": dedupe.url})
        # Every workflow, as the session's n8n: its template database is reused, nothing is imported again.
        n8n, stop_n8n = start_n8n(view, emulators, tmp_path_factory.mktemp("n8n-dedupe-llm"),
                                  worker=f"{worker_id}dedupellm")
    except BaseException:
        dedupe.stop()
        raise
    try:
        yield SimpleNamespace(services=services, n8n=n8n, dedupe=dedupe)
    finally:
        stop_n8n()
        dedupe.stop()


@pytest.fixture
def llm_flow(llm_site: Any) -> Iterator[Any]:
    _policy_and_model_ready(llm_site.services, llm_site.dedupe.url)
    yield llm_site
    _quiet(llm_site.n8n)


_wait = functools.partial(wait_until, timeout=60.0)


def _sql(database_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:  # commits on leaving the block
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description is not None else []


def _runs(services: Any) -> list[dict[str, Any]]:
    return services.get("guardrails", "/v1/runs?task=dedupe&limit=1000", caller="ops").json()  # type: ignore[no-any-return]


def _intake(services: Any) -> list[tuple[str, str | None, str | None]]:
    return [tuple(r) for r in _sql(services.database_url, "SELECT outcome, reason, issue_key FROM dedupe.intake ORDER BY id")]


def _checks(services: Any) -> list[tuple[str, str]]:
    return [tuple(r) for r in _sql(services.database_url,
                                   "SELECT idempotency_key, ticket_key FROM dedupe.duplicate_checks ORDER BY created_at")]


def _actions(services: Any, run_id: str) -> list[dict[str, Any]]:
    r = services.get("guardrails", f"/v1/actions?run_id={run_id}", caller="ops")
    assert r.status_code == 200, r.text
    return sorted(r.json(), key=lambda a: a["operation"])  # type: ignore[no-any-return]


def _index_in_dedupe(services: Any, emu: Any, keys: list[str]) -> None:
    """The earlier tickets, as the back-fill would have indexed them from Jira."""
    issues = emu.jira_state()["issues"]
    tickets = [{"key": k, "summary": issues[k]["fields"]["summary"], "status": "Open", "project": "SUP",
                "description": adf_to_text(issues[k]["fields"].get("description")),
                "created": "2025-01-06T09:00:00+00:00"} for k in keys]
    r = services.post("dedupe", "/v1/tickets", caller="ops", json={"tickets": tickets})
    assert r.status_code == 200, r.text


def _finished_run(services: Any, issue_id: str) -> dict[str, Any]:
    runs = _wait(lambda: [r for r in _runs(services) if r["external_id"] == f"jira-issue:{issue_id}"
                          and r["status"] != "open"])
    assert len(runs) == 1, runs
    return runs[0]  # type: ignore[no-any-return]


def _new_defect(emu: Any, n8n: Any, issue: dict[str, Any], **hook: Any) -> tuple[str, str]:
    emu.jira_register_webhook(f"{n8n.url}/webhook/{HOOK}", events=["jira:issue_created"], **hook)
    key = emu.jira_seed([issue], fire_webhooks=True)[0]
    return key, emu.jira_state()["issues"][key]["id"]


# ------------------------------------------------------------------ end to end


def test_a_duplicate_gets_one_comment_and_one_duplicate_link_even_when_redelivered(llm_flow: Any, emu: Any) -> None:
    services, n8n = llm_flow.services, llm_flow.n8n
    old, other = emu.jira_seed([OLD, UNRELATED])
    _index_in_dedupe(services, emu, [old, other])
    # The model (the Anthropic emulator, through guardrails' gateway) confirms the search's best candidate.
    emu.script_anthropic([{"tool_input": {"duplicate_of": old, "confidence": 0.96,
                                          "rationale": "Both report negative leave balances after a doubled accrual."}}])
    new, new_id = _new_defect(emu, n8n, {**OLD, "created": "2025-02-03T10:00:00.000+0000"})
    run = _finished_run(services, new_id)
    assert run["status"] == "succeeded" and run["workflow"] == "dedupe-jira-webhook", run
    assert (run["outcome"]["ticket"], run["outcome"]["verdict"], run["outcome"]["duplicate_of"]) == \
        (new, "duplicate", old)
    # The verification was one model call, through guardrails, charged to the flow's run.
    assert len(emu.anthropic_requests("/v1/messages")) == 1
    assert run["budget"]["spent_micros"] > 0, run["budget"]
    actions = _actions(services, run["id"])
    assert [(a["operation"], a["target"], a["status"], a["rule"]) for a in actions] == [
        ("add_comment", new, "pending_approval", "duplicate-comment"),
        ("link_issues", new, "pending_approval", "duplicate-links")]
    comment, link = actions
    # Jira's semantics: inwardIssue = the new ticket ("duplicates"), outwardIssue = the old one ("is duplicated by").
    assert {k: link["payload"][k] for k in ("type", "inward", "outward")} == \
        {"type": "Duplicate", "inward": new, "outward": old}
    text = json.dumps(comment["payload"]["body"])
    assert f"{new} appears to duplicate {old}" in text and "why: text similarity" in text
    assert re.search(rf"1\. {old} \(score \d\.\d{{3}}, confidence \d\.\d\d, Open\)", text), text
    assert comment["payload"]["internal"] is True
    # Both wait for a human: guardrails queued each for the shared approval-request workflow (as triage's are).
    queued = _sql(services.database_url, "SELECT payload->>'action_id' FROM guardrails.notify_outbox "
                                         "WHERE kind = 'approval_request'")
    assert sorted(q[0] for q in queued) == sorted(a["id"] for a in actions)
    # The new defect is in the index now: the next report can find it.
    assert _sql(services.database_url, "SELECT count(*) FROM dedupe.tickets WHERE key = %s", new) == [(1,)]

    # Jira redelivers (same identifier): acknowledged, nothing runs again.
    for _ in range(2):
        emu._post(emu.jira_url + "/_emulator/jira/webhooks/redeliver", {})
    _wait(lambda: [r for r in _intake(services) if r[0] == "duplicate"][1:])
    assert [r[0] for r in _intake(services)] == ["accepted", "duplicate", "duplicate"]
    assert [a["status"] for d in emu.jira_state()["deliveries"] for a in d["attempts"]] == [202, 200, 200]
    assert len([r for r in _runs(services) if r["external_id"] == f"jira-issue:{new_id}"]) == 1
    assert [c[1] for c in _checks(services)] == [new]
    assert [a["id"] for a in _actions(services, run["id"])] == [a["id"] for a in actions]
    assert len(services.get("guardrails", "/v1/actions?operation=add_comment", caller="ops").json()) == 1
    assert emu.jira_state()["comments"][new] == [] and emu.jira_state()["links"] == []

    # A human approves both (as the approval workflow does with the form's answer); guardrails writes each once.
    for a in actions:
        r = services.post("guardrails", f"/v1/actions/{a['id']}/decision", caller="n8n",
                          json={"decision": "approve", "approver": APPROVER,
                                "channel": "n8n-form"})
        assert r.status_code == 200 and r.json()["status"] == "executed", r.text
    state = emu.jira_state()
    assert [(x["type"], x["inward"], x["outward"], x["description"]) for x in state["links"]] == \
        [("Duplicate", new, old, f"{new} duplicates {old}")]
    assert len(state["comments"][new]) == 1 and state["comments"][old] == []
    written = state["comments"][new][0]["text"]
    assert old in written and f"Metis action {comment['id']}" in written
    # The old ticket shows the other end of the link.
    links_of_old = state["issues"][old]["fields"]["issuelinks"]
    assert [(lk["type"]["name"], lk["inwardIssue"]["key"]) for lk in links_of_old] == [("Duplicate", new)]
    # Another redelivery after the writes: still one comment, one link.
    emu._post(emu.jira_url + "/_emulator/jira/webhooks/redeliver", {})
    _wait(lambda: [r for r in _intake(services) if r[0] == "duplicate"][2:])
    state = emu.jira_state()
    assert len(state["comments"][new]) == 1 and len(state["links"]) == 1


def test_no_duplicate_means_no_proposal_and_a_finished_run(flow: Any, emu: Any) -> None:
    services, n8n = flow.services, flow.n8n
    other = emu.jira_seed([UNRELATED])
    _index_in_dedupe(services, emu, other)
    new, new_id = _new_defect(emu, n8n, {"project": "SUP", "issuetype": "Bug",
                                         "summary": "Kiosk badge reader rejects valid cards after firmware update",
                                         "description": "Since the 3.2 firmware the reader beeps red for every badge."})
    run = _finished_run(services, new_id)
    assert run["status"] == "succeeded" and run["outcome"]["verdict"] == "none", run
    assert run["outcome"]["actions"] == []
    assert _actions(services, run["id"]) == []
    assert [c[1] for c in _checks(services)] == [new]
    assert emu.jira_state()["comments"][new] == []
    assert _sql(services.database_url, "SELECT run_id, verdict FROM dedupe.claims") == [(run["id"], "none")]


def test_a_forged_signature_is_refused_and_nothing_runs(flow: Any, emu: Any) -> None:
    services, n8n = flow.services, flow.n8n
    _new_defect(emu, n8n, dict(OLD), secret="not-the-secret-at-all")
    # Jira retries a refused delivery; wait until it gives up so that nothing arrives after this test.
    failed = _wait(lambda: [d for d in emu.jira_state()["deliveries"] if d["status"] == "failed"])
    assert [a["status"] for a in failed[0]["attempts"]] == [401, 401, 401]
    assert _intake(services) == [("rejected", "invalid_signature", None)] * 3
    assert _runs(services) == [] and _checks(services) == []
    # A delivery without any signature is refused the same way.
    r = n8n.webhook(HOOK, data=json.dumps({"webhookEvent": "jira:issue_created"}).encode(),
                    headers={"Content-Type": "application/json", "X-Atlassian-Webhook-Identifier": "nosig-1"})
    assert r.status_code == 401 and r.json()["code"] == "invalid_signature"
    assert len(_intake(services)) == 4 and _runs(services) == []


def test_a_story_is_acknowledged_and_ignored(flow: Any, emu: Any) -> None:
    services, n8n = flow.services, flow.n8n
    key, _ = _new_defect(emu, n8n, {"project": "SUP", "issuetype": "Story", "summary": "Dark mode for the kiosk"})
    delivered = _wait(lambda: [d for d in emu.jira_state()["deliveries"] if d["status"] == "delivered"])
    assert [a["status"] for a in delivered[0]["attempts"]] == [200]
    assert _intake(services) == [("ignored", "not_checked", key)]
    assert _runs(services) == [] and _checks(services) == []


def test_a_budget_denial_is_one_clean_refusal(flow: Any, emu: Any) -> None:
    services, n8n = flow.services, flow.n8n
    caps = services.get("guardrails", "/v1/budgets", caller="ops").json()["caps"]
    cap = next(c for c in caps if c["scope"] == "task_daily" and c["task"] == "dedupe")
    _sql(services.database_url, "INSERT INTO guardrails.caps (key, scope, lock_rank, task, period, limit_micros, "
                                "spent_micros) VALUES (%s, 'task_daily', 2, 'dedupe', %s, %s, %s) "
                                "ON CONFLICT (key) DO UPDATE SET spent_micros = EXCLUDED.limit_micros",
         cap["key"], cap["period"], cap["limit_micros"], cap["limit_micros"])
    refusals_before = _run_refusals(services)
    key, issue_id = _new_defect(emu, n8n, dict(OLD))
    refused = _wait(lambda: [r for r in _intake(services) if r[0] == "refused"])
    assert refused == [("refused", "task_daily_cap_exhausted", key)]
    detail = _sql(services.database_url, "SELECT detail FROM dedupe.intake WHERE outcome = 'refused'")[0][0]
    assert detail.startswith("guardrails answered 403: ") and "cap is exhausted" in detail
    execution = n8n.wait_for_execution(workflow_id=WORKFLOW)
    assert execution["status"] == "success", n8n.log()
    ran = n8n.node_runs(execution["id"])
    assert ran["Open run"] == 1 and ran["Record refusal"] == 1, ran
    assert "Check duplicates" not in ran and "Finish run" not in ran
    # One attempt: guardrails answered exactly one 403 to POST /v1/runs (n8n did not retry the denial).
    assert _run_refusals(services) - refusals_before == 1
    denials = _sql(services.database_url, "SELECT data->>'external_id', data->>'reason' FROM guardrails.audit_log "
                                          "WHERE kind = 'run.denied'")
    assert denials == [(f"jira-issue:{issue_id}", "task_daily_cap_exhausted")]
    assert _runs(services) == [] and _checks(services) == []
    # The claim was given up: once the budget allows, a redelivery of that issue is checked.
    assert _sql(services.database_url, "SELECT count(*) FROM dedupe.claims") == [(0,)]
    _sql(services.database_url, "UPDATE guardrails.caps SET spent_micros = 0 WHERE key = %s", cap["key"])
    emu._post(emu.jira_url + "/_emulator/jira/webhooks/redeliver", {})
    run = _finished_run(services, issue_id)
    assert run["status"] == "succeeded" and run["outcome"]["ticket"] == key, run
    assert [r[0] for r in _intake(services)] == ["accepted", "refused", "accepted"]


def test_guardrails_failing_at_the_proposal_is_tried_again_and_nothing_is_lost(flow: Any, emu: Any) -> None:
    """guardrails answers 500 to the proposal (its actions table is renamed away after the run opened; Jira's
    delivery was already answered 202, so Jira will not send it again): n8n proposes every proposal again 2 s
    later, at most twice more. Once guardrails is back the comment is proposed exactly once and the run succeeds."""
    from tests.triage.conftest import answered, delta

    services, n8n = flow.services, flow.n8n
    _index_in_dedupe(services, emu, emu.jira_seed([OLD]))
    before = answered(services, "guardrails", "POST", "/v1/actions")
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE guardrails.actions RENAME TO actions_unavailable")
        try:
            new, new_id = _new_defect(emu, n8n, {**OLD, "created": "2025-02-03T10:00:00.000+0000"})
            _wait(lambda: delta(answered(services, "guardrails", "POST", "/v1/actions"), before).get("500"))
        finally:
            conn.execute("ALTER TABLE guardrails.actions_unavailable RENAME TO actions")
    run = _finished_run(services, new_id)
    assert run["status"] == "succeeded" and run["outcome"]["verdict"] == "possible", run
    assert [(a["operation"], a["http"]) for a in run["outcome"]["actions"]] == [("add_comment", 201)], run
    attempts = delta(answered(services, "guardrails", "POST", "/v1/actions"), before)
    assert set(attempts) == {"500", "201"} and attempts["201"] == 1 and attempts["500"] in (1, 2), attempts
    [comment] = _actions(services, run["id"])
    assert (comment["operation"], comment["target"], comment["status"]) == ("add_comment", new, "pending_approval")
    ran = n8n.node_runs(n8n.wait_for_execution(workflow_id=WORKFLOW)["id"])
    assert ran["Propose to guardrails"] == 1 + attempts["500"] and ran["Finish run (proposed)"] == 1, ran
    assert ran["Wait before proposing again"] == attempts["500"], ran


def _run_refusals(services: Any) -> float:
    """403 answers guardrails gave to POST /v1/runs (its Prometheus request counter)."""
    text = services.get("guardrails", "/metrics", caller=None).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "metis_http_requests_total" and sample.labels.get("method") == "POST"
               and sample.labels.get("status") == "403" and sample.labels.get("endpoint") == "/v1/runs")

