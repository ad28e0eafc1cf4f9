"""Flow benchmark: 50 Jira webhooks within 10 s through real n8n, 10 of them delivered twice.

Checks exactly 50 runs and 50 stored triages (none lost, none doubled) and measures the time from each
webhook's first delivery attempt to the stored triage (its proposals built), with the LLM excluded
(offline mode), on this machine. Runs as a pytest module so it reuses the test stack fixtures:

    .venv/bin/python -m pytest -p tests.conftest benchmarks/triage_flow.py -s -q -p no:cacheprovider

If guardrails' actions API exists, the proposals it holds are counted too.
"""
from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from tests.conftest import auth

N, TWICE = 50, 10
OUT = Path(__file__).resolve().parent / "triage_results" / "flow.json"


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(p / 100 * (len(values) - 1)))))
    return values[k]


@pytest.mark.e2e
@pytest.mark.xdist_group("n8n")
def test_fifty_webhooks(stack: Any, emu: Any) -> None:
    n8n, services = stack.n8n, stack.services
    # Resolved, labelled history in dedupe, so the offline vote is confident and every ticket gets the
    # normal proposal (with an empty index every ticket would be escalated instead).
    history = [{"key": f"HIST-{i}", "summary": f"Timesheet approval fails with an error for location {i % 7}",
                "description": "Managers get an error when approving timesheets; fixed the approval rule.",
                "status": "Resolved", "resolution": "Fixed", "resolution_text": "Re-published the approval rule.",
                "priority": "Major", "components": ["web-app"], "labels": ["category-timesheets"],
                "project": "HIST", "created": "2025-01-01T10:00:00+00:00"} for i in range(20)]
    deadline = time.monotonic() + 180
    while services.get("dedupe", "/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert services.post("dedupe", "/v1/tickets", caller="ops", json={"tickets": history}).status_code == 200
    # Synchronous webhooks: each seed call delivers its webhook before answering, so 25 callers in
    # parallel put up to 25 deliveries in flight at once (Jira Cloud sends concurrently too).
    emu.jira_register_webhook(f"{n8n.url}/webhook/metis-triage-jira", events=["jira:issue_created"])
    t0 = time.time()

    def create(i: int) -> list[str]:
        time.sleep(max(0.0, t0 + i * 0.15 - time.time()))  # 50 webhooks over ~7.5 s
        return emu.jira_seed([{"project": "SUP", "issuetype": "Bug" if i % 2 else "Task",
                               "summary": f"Ticket {i}: timesheet approval fails for location {i % 7}",
                               "description": "Managers get an error when approving timesheets." * (1 + i % 5)}],
                             fire_webhooks=True)

    with ThreadPoolExecutor(25) as pool:
        keys = [k for ks in pool.map(create, range(N)) for k in ks]
    seeded_in = time.time() - t0
    state = emu.jira_state()
    idents = [d["identifier"] for d in state["deliveries"]][:TWICE]
    for ident in idents:
        requests.post(emu.jira_url + "/_emulator/jira/webhooks/redeliver", json={"identifier": ident},
                      timeout=10).raise_for_status()
    sent_in = time.time() - t0
    deadline = time.monotonic() + 180
    while True:
        with psycopg.connect(services.database_url) as conn:
            done = conn.execute("SELECT ticket_key, created_at FROM triage.results").fetchall()
            pairs = conn.execute("SELECT ticket_key, run_id FROM triage.results").fetchall()
            intake = conn.execute("SELECT outcome, count(*) FROM triage.intake GROUP BY outcome").fetchall()
        counts = dict(intake)
        listed = services.get("guardrails", "/v1/actions?limit=1000", caller="ops")
        n_actions = len(listed.json()) if listed.status_code == 200 else 0
        if (len(done) >= N and counts.get("duplicate", 0) >= TWICE and (listed.status_code != 200 or n_actions >= 2 * N)
                or time.monotonic() > deadline):
            break
        time.sleep(0.25)
    runs = [r for r in services.get("guardrails", "/v1/runs?task=triage&limit=1000", caller="ops").json()
            if r["workflow"] == "triage-jira-webhook"]
    first_attempt = {}
    for d in emu.jira_state()["deliveries"]:
        key = d["body"]["issue"]["key"]
        at = min(a["at"] for a in d["attempts"]) if d["attempts"] else None
        if at is not None:
            first_attempt[key] = min(first_attempt.get(key, at), at)
    lat = [(created.replace(tzinfo=created.tzinfo or timezone.utc).timestamp() - first_attempt[key]) * 1000
           for key, created in done if key in first_attempt]
    actions = requests.get(services.url("guardrails") + "/v1/actions?limit=1000", headers=auth("ops"), timeout=10)
    proposals = None
    if actions.status_code == 200:
        listed_actions = actions.json()
        comments = [a for a in listed_actions if a["operation"] == "add_comment"]
        proposals = {"actions": len(listed_actions), "comment_proposals": len(comments),
                     "distinct_comment_targets": len({a["target"] for a in comments}),
                     "statuses": dict(Counter(a["status"] for a in listed_actions))}
        created_at = {a["target"]: a["created_at"] for a in comments}
        lat_p = [(datetime.fromisoformat(created_at[k]).timestamp() - first_attempt[k]) * 1000
                 for k in created_at if k in first_attempt]
    else:
        lat_p = []
    result = {"webhooks": N, "redelivered": TWICE, "sent_within_s": round(sent_in, 2), "seeded_within_s": round(seeded_in, 2),
              "first_attempt_span_s": round(max(first_attempt.values()) - min(first_attempt.values()), 2),
              "runs": len(runs), "distinct_run_external_ids": len({r["external_id"] for r in runs}),
              "stored_triages": len(done), "distinct_tickets": len({k for k, _ in done}), "intake": counts,
              "guardrails_proposals": proposals,
              "webhook_to_proposal_ms": {"p50": round(statistics.median(lat_p), 1), "p95": round(_pct(lat_p, 95), 1),
                                         "max": round(max(lat_p), 1)} if lat_p else None,
              "webhook_to_stored_triage_ms": {"p50": round(statistics.median(lat), 1), "p95": round(_pct(lat, 95), 1),
                             "max": round(max(lat), 1)} if lat else None}
    ext = {r["id"]: r["external_id"] for r in runs}
    ids = {k: v["id"] for k, v in emu.jira_state()["issues"].items()}
    result["mismatched"] = [(k, ext.get(rid), ids.get(k)) for k, rid in pairs
                            if ext.get(rid) != f"jira-issue:{ids.get(k)}"]
    print("\n" + json.dumps(result, indent=2))
    OUT.write_text(json.dumps(result, indent=2))
    assert len(runs) == N and result["distinct_run_external_ids"] == N
    assert len(done) == N and result["distinct_tickets"] == N
    assert counts.get("accepted") == N and counts.get("duplicate") == TWICE
    if proposals is not None:
        assert proposals["comment_proposals"] == N and proposals["distinct_comment_targets"] == N
