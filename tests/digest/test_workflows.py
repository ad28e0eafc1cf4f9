"""The digest workflow files: the success chain, a failure path from every step, no heartbeat on failure."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.digest.api import api

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "n8n" / "workflows").glob("digest-*.json"))
CHAIN = ["Schedule", "Parameters", "Open run", "Build digest", "Post to Slack", "Send email", "Heartbeat",
         "Finish run"]


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _targets(wf: dict[str, Any], node: str, output: int) -> list[str]:
    outs = wf["connections"].get(node, {}).get("main", [])
    return [c["node"] for c in outs[output]] if output < len(outs) else []


def _reachable(wf: dict[str, Any], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        for outs in wf["connections"].get(n, {}).get("main", []):
            for c in outs:
                if c["node"] not in seen:
                    seen.add(c["node"])
                    todo.append(c["node"])
    return seen


def test_there_is_one_workflow_per_job():
    assert [p.name for p in FILES] == ["digest-health.json", "digest-monitor.json", "digest-patterns.json",
                                       "digest-weekly.json"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_success_chain_and_failure_path(path: Path):
    wf = _load(path)
    nodes = {n["name"]: n for n in wf["nodes"]}
    assert nodes["Schedule"]["type"] == "n8n-nodes-base.scheduleTrigger"
    for a, b in zip(CHAIN, CHAIN[1:]):
        assert _targets(wf, a, 0) == [b], f"{a} → {b}"
    # Every step after the trigger reports its failure; the failure path never sends the heartbeat.
    for step in CHAIN[2:]:
        assert nodes[step].get("onError") == "continueErrorOutput", step
        assert _targets(wf, step, 1) == ["Describe failure"], step
    failure = _reachable(wf, "Describe failure")
    assert {"Alert Slack", "Alert email", "Finish run as failed", "Fail the execution"} <= failure
    assert "Heartbeat" not in failure and "Build digest" not in failure
    assert nodes["Fail the execution"]["type"] == "n8n-nodes-base.stopAndError"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_calls_a_real_endpoint_with_a_known_heartbeat(path: Path):
    wf = _load(path)
    nodes = {n["name"]: n for n in wf["nodes"]}
    url = nodes["Build digest"]["parameters"]["url"]
    m = re.fullmatch(r"=\{\{ \$env\.METIS_DIGEST_URL \}\}(/v1/[a-z-]+)", url)
    assert m, url
    assert any(ep.rule == m.group(1) and "POST" in ep.methods for ep in api.endpoints)
    params = {a["name"]: a["value"] for a in nodes["Parameters"]["parameters"]["assignments"]["assignments"]}
    policy = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())
    assert params["heartbeat"] in policy["heartbeats"]
    assert "digest" in policy["tasks"] and "schedule" in policy["tasks"]["digest"]["triggers"]
    assert json.loads(params["rules"]) == {}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_expressions_never_close_early(path: Path):
    # n8n ends an expression at the first "}}": an object literal closing with "}}" truncates it.
    for node in _load(path)["nodes"]:
        for chunk in json.dumps(node["parameters"]).split("{{")[1:]:
            inner = chunk.split("}}")[0]
            assert inner.count("{") == inner.count("}"), (node["name"], inner)
