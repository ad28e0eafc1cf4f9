"""Cost per triage as guardrails settles it: the triage service in LLM mode → the real guardrails gateway →
the Anthropic emulator, one run per ticket, a stream of real ticket texts (gitbugs-hadoop).

    .venv/bin/python -m pytest -p tests.conftest benchmarks/triage_cost_gateway.py -s -q -p no:cacheprovider

Reports what the runs were charged (guardrails' ledger), the cache share of input tokens, and the worst case
guardrails reserved before each call (what the caps must leave room for).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.processes import free_port, start_service
from devstack.stack import service_env
from services.triage.config import load_prices, load_taxonomy, load_triage_config
from tests.conftest import TEST_TOKENS, auth

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop" / "issues.csv"
OUT = Path(__file__).resolve().parent / "triage_results" / "cost-gateway.json"
N = 60


@pytest.mark.e2e
def test_cost_through_the_gateway(services: Any, emu: Any, tmp_path: Path) -> None:
    env = service_env("triage", base=os.environ, database_url=services.database_url, tokens=TEST_TOKENS,
                      urls=services.urls, externals=services.externals, config_dir=str(ROOT / "config"))
    env["METIS_TRIAGE_LLM"] = "on"
    proc = start_service("triage", env=env, port=free_port(), log_dir=tmp_path, workers=1)
    try:
        cfg = load_triage_config(ROOT / "config" / "triage.yaml", load_taxonomy(ROOT / "config" / "taxonomy.yaml"))
        answers = [dict(ex.answer, references=[]) for ex in cfg.examples if not ex.answer["needs_human"]]
        emu.script_anthropic([{"tool_input": answers[i % len(answers)]} for i in range(N)])
        csv.field_size_limit(sys.maxsize)
        rows = list(csv.DictReader(open(DATA, newline="", encoding="utf-8")))[-N:]
        costs, reserved, usage = [], [], []
        for i, row in enumerate(rows):
            run = services.post("guardrails", "/v1/runs", caller="n8n", json={
                "task": "triage", "trigger": "event", "workflow": "bench", "external_id": uuid.uuid4().hex}).json()
            r = requests.post(proc.url + "/v1/triage", headers=auth("n8n"), timeout=60, json={
                "run_id": run["id"], "submit": False,
                "ticket": {"key": f"SUP-{i + 1}", "summary": row["Summary"], "description": row["Description"]}})
            body = r.json()
            assert r.status_code == 200 and body["mode"] == "llm", body
            charged = services.get("guardrails", f"/v1/runs/{run['id']}", caller="ops").json()["budget"]
            costs.append(charged["spent_micros"] / 1e6)
            usage.append(body["cost"])
        # guardrails' worst case per call (config/policy.yaml input_bound): one token per request byte plus
        # fixed overheads, at the model's highest input rate (1-hour cache write), plus max_tokens of output.
        prices = load_prices(ROOT / "config")["claude-haiku-4-5"]
        top_in = max(prices[k] for k in ("input", "cache_write_5m", "cache_write_1h", "cache_read"))
        for req in emu.anthropic_requests("/v1/messages"):
            size = len(json.dumps(req["body"]).encode())
            reserved.append(((size + 64 + 600) * top_in + req["body"]["max_tokens"] * prices["output"]) / 1e6)
    finally:
        proc.stop()
    total_in = sum(u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"] for u in usage)
    result = {"triages": N, "model": "claude-haiku-4-5",
              "usd_charged_total": round(sum(costs), 6),
              "usd_per_triage_mean": round(statistics.mean(costs), 6),
              "usd_per_triage_median": round(statistics.median(costs), 6),
              "usd_first_triage": round(costs[0], 6),
              "cache_read_share": round(sum(u["cache_read_input_tokens"] for u in usage) / total_in, 4),
              "service_reported_equals_ledger": all(abs(u["usd"] - c) < 2e-6 for u, c in zip(usage, costs)),
              "reserved_worst_case_usd_median_approx": round(statistics.median(reserved), 6) if reserved else None}
    print("\n" + json.dumps(result, indent=2))
    OUT.write_text(json.dumps(result, indent=2))
    assert result["cache_read_share"] >= 0.8 and result["service_reported_equals_ledger"]
