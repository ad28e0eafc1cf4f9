"""Mechanics of dedupe's LLM verification: a dedupe gunicorn process with verification on → the real guardrails
gateway → the Anthropic emulator, on real gitbugs-hadoop reports. One guardrails run per query, as the n8n flow
opens one per Jira event.

    .venv/bin/python -m pytest -p tests.conftest benchmarks/dedupe_llm_mechanics.py -s -q -p no:cacheprovider

Measures what a verification costs (guardrails' ledger, per run), how many reports reach verification at the
shipped "possible" threshold, the cache share of input tokens, and that a budget denial leaves the offline
verdict standing with `mode: "offline"` and says so. The emulator answers "no duplicate" to every call: this
measures cost and plumbing only, NOT the model's judgement (there is no real model here).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.processes import free_port, start_service, wait_http
from devstack.stack import service_env
from services.dedupe.config import copy_with_llm_enabled, load_config
from tests.conftest import TEST_TOKENS, auth

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop" / "issues.csv"
OUT = Path(__file__).resolve().parent / "results" / "dedupe_llm_mechanics.json"
HISTORY = 600   # reports indexed (the oldest, in time order)
QUERIES = 120   # the reports after them, each checked against the history


def _reports() -> list[dict[str, Any]]:
    csv.field_size_limit(sys.maxsize)
    rows = list(csv.DictReader(open(DATA, newline="", encoding="utf-8", errors="replace")))
    out = []
    for r in rows:
        created = datetime.strptime(r["Created"], "%d/%b/%y %H:%M").replace(tzinfo=timezone.utc)
        out.append({"key": f"GB-{r['Issue id']}", "summary": r["Summary"] or "(no summary)",
                    "description": r["Description"] or "", "created": created.isoformat()})
    return sorted(out, key=lambda t: t["created"])


@pytest.mark.e2e
def test_llm_verification_mechanics(services: Any, emu: Any, tmp_path: Path) -> None:
    config_dir = copy_with_llm_enabled(ROOT / "config", tmp_path / "config")
    env = service_env("dedupe", base=os.environ, database_url=services.database_url, tokens=TEST_TOKENS,
                      urls=services.urls, externals=services.externals, config_dir=str(config_dir))
    env["METIS_DEDUPE_LLM"] = "on"
    proc = start_service("dedupe", env=env, port=free_port(), log_dir=tmp_path, workers=1)
    tag = "BENCH" + uuid.uuid4().hex[:4].upper()
    reports = [{**t, "key": t["key"].replace("GB", tag), "project": tag} for t in _reports()]
    history, queries = reports[:HISTORY], reports[HISTORY:HISTORY + QUERIES]
    emu.script_anthropic([{"tool_input": {"duplicate_of": None, "confidence": 0.5,
                                          "rationale": "emulator: scripted answer"}}] * QUERIES)
    try:
        wait_http(proc, "/readyz", timeout=300)
        for i in range(0, len(history), 100):
            r = requests.post(proc.url + "/v1/tickets", json={"tickets": history[i:i + 100]}, headers=auth("n8n"),
                              timeout=300)
            assert r.status_code == 200, r.text
        verified, offline_verdicts, costs, modes = [], {"possible": 0, "none": 0, "duplicate": 0}, [], []
        for q in queries:
            run = services.post("guardrails", "/v1/runs", caller="n8n", json={
                "task": "dedupe", "trigger": "event", "workflow": "bench", "external_id": uuid.uuid4().hex}).json()
            body = requests.post(proc.url + "/v1/duplicates", headers=auth("n8n"), timeout=60, json={
                "ticket": q, "created_before": q["created"], "filters": {"project": [tag]}, "limit": 5,
                "run_id": run["id"]}).json()
            spent = services.get("guardrails", f"/v1/runs/{run['id']}", caller="ops").json()["budget"]["spent_usd"]
            modes.append(body["mode"])
            if body["mode"] == "llm":
                verified.append(body["confidence"])
                costs.append(spent)
                offline_verdicts["possible"] += 1
            else:
                assert spent == 0 and body["verdict"] == "none", body  # no call below the "possible" threshold
                offline_verdicts["none"] += 1
        calls = emu.anthropic_requests("/v1/messages")
        assert len(calls) == len(costs)
        usage = [c["response"]["usage"] for c in calls if isinstance(c.get("response"), dict)
                 and "usage" in c["response"]]
        # Budget denial: a run whose cap cannot cover the call's worst case.
        denial = {}
        for q in queries:
            plain = requests.post(proc.url + "/v1/duplicates", headers=auth("n8n"), timeout=60, json={
                "ticket": q, "created_before": q["created"], "filters": {"project": [tag]}, "limit": 5}).json()
            if plain["verdict"] == "none":
                continue
            run = services.post("guardrails", "/v1/runs", caller="n8n", json={
                "task": "e2e-capped", "trigger": "event", "workflow": "bench", "external_id": uuid.uuid4().hex}).json()
            before = len(emu.anthropic_requests("/v1/messages"))
            denied = requests.post(proc.url + "/v1/duplicates", headers=auth("n8n"), timeout=60, json={
                "ticket": q, "created_before": q["created"], "filters": {"project": [tag]}, "limit": 5,
                "run_id": run["id"]}).json()
            denial = {"mode": denied["mode"], "mode_detail": denied["mode_detail"], "verdict": denied["verdict"],
                      "offline_verdict": plain["verdict"],
                      "same_candidates": denied["candidates"] == plain["candidates"],
                      "calls_reaching_the_model": len(emu.anthropic_requests("/v1/messages")) - before,
                      "charged_usd": services.get("guardrails", f"/v1/runs/{run['id']}",
                                                  caller="ops").json()["budget"]["spent_usd"]}
            break
    finally:
        proc.stop()
    sizes = [len(json.dumps(c["body"]).encode()) for c in calls]
    result = {
        "model": load_config(config_dir).llm.model, "history_indexed": len(history), "queries": len(queries),
        "reached_verification": len(costs), "share_verified": round(len(costs) / len(queries), 3),
        "usd_per_verification_median": round(statistics.median(costs), 6) if costs else None,
        "usd_per_verification_max": round(max(costs), 6) if costs else None,
        "usd_per_report_mean": round(sum(costs) / len(queries), 6),
        "request_bytes_median": statistics.median(sizes) if sizes else None,
        "input_tokens_median": statistics.median(u.get("input_tokens", 0) for u in usage) if usage else None,
        "output_tokens_median": statistics.median(u.get("output_tokens", 0) for u in usage) if usage else None,
        "cache_read_tokens_total": sum(u.get("cache_read_input_tokens", 0) or 0 for u in usage),
        "cache_creation_tokens_total": sum(u.get("cache_creation_input_tokens", 0) or 0 for u in usage),
        "budget_denial": denial,
        "note": "emulated model: cost and plumbing only, no verdict quality",
    }
    print("\n" + json.dumps(result, indent=2))
    OUT.write_text(json.dumps(result, indent=2))
    assert costs and all(0 < c < 0.01 for c in costs)
    assert denial and denial["mode"] == "offline" and "denied" in denial["mode_detail"]
    assert denial["verdict"] == denial["offline_verdict"] and denial["calls_reaching_the_model"] == 0
