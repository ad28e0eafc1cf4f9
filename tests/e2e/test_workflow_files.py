"""Workflow files in n8n/workflows/ hold no secret, reference credentials only by id, and reach services via $env."""
from __future__ import annotations

import json
import math
import re
from typing import Any, Iterator

import pytest

from devstack.n8n import KNOWN_CREDENTIAL_IDS, SMOKE_WEBHOOK_PATH, WORKFLOWS_DIR, WorkflowFile, workflow_files

SECRET_PATTERNS = {
    "Anthropic key": re.compile(r"sk-ant-[A-Za-z0-9_-]{8,}"),
    "Slack token": re.compile(r"xox[abposr]-[A-Za-z0-9-]{8,}"),
    "Slack webhook URL": re.compile(r"hooks\.slack\.com/services/"),
    "bearer token": re.compile(r"(?i)\bbearer\s+(?!\{\{)[A-Za-z0-9._~+/=-]{8,}"),
    "basic auth": re.compile(r"(?i)\bbasic\s+[A-Za-z0-9+/=]{12,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}"),
    "password in URL": re.compile(r"://[^/\s:@]+:[^/\s@]+@"),
    "Metis token": re.compile(r"\b(?:test|metis)-[a-z0-9]+-[0-9a-f]{16,}\b"),
}
SENSITIVE_KEYS = re.compile(r"(?i)^(password|passwd|secret|client_?secret|token|access_?token|api_?key|x-api-key"
                            r"|authorization|private_?key|encryption_?key)$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
LOCAL_ADDRESS = re.compile(r"(?i)(127\.0\.0\.1|localhost|0\.0\.0\.0|:\d{4,5}/)")


def _walk(value: Any, path: str = "$") -> Iterator[tuple[str, str | None, Any]]:
    """(path, key, value) for every value in a JSON document."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}", str(k), v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield f"{path}[{i}]", None, v
            yield from _walk(v, f"{path}[{i}]")


def _entropy(s: str) -> float:
    counts = {c: s.count(c) for c in set(s)}
    return -sum(n / len(s) * math.log2(n / len(s)) for n in counts.values())


def _is_expression(s: str) -> bool:
    return s.startswith("=") or "{{" in s


def find_secrets(workflow: dict[str, Any]) -> list[str]:
    """Every secret-looking value in a workflow document, as 'path: reason'."""
    found: list[str] = []
    for path, key, value in _walk(workflow):
        if isinstance(value, dict) and {"name", "value"} <= value.keys() and isinstance(value["value"], str):
            # n8n header/query parameter pairs: {"name": "Authorization", "value": "..."}.
            if SENSITIVE_KEYS.match(str(value["name"])) and value["value"] and not _is_expression(value["value"]):
                found.append(f"{path}: literal value for {value['name']}")
        if not isinstance(value, str):
            continue
        for reason, pattern in SECRET_PATTERNS.items():
            if pattern.search(value):
                found.append(f"{path}: {reason}")
        if key and SENSITIVE_KEYS.match(key) and value and not _is_expression(value):
            found.append(f"{path}: literal value for {key}")
        for run in re.findall(r"[A-Za-z0-9+/_=-]{32,}", value):
            if not UUID.match(run) and _entropy(run) > 4.0:
                found.append(f"{path}: high-entropy string")
    return found


def credential_problems(workflow: dict[str, Any]) -> list[str]:
    """Credentials must be references by id and name to credentials the harness creates."""
    problems: list[str] = []
    for node in workflow.get("nodes", []):
        for kind, ref in (node.get("credentials") or {}).items():
            if not isinstance(ref, dict) or set(ref) - {"id", "name"}:
                problems.append(f"{node['name']}: {kind} credential must be {{id, name}} only, got {ref!r}")
            elif KNOWN_CREDENTIAL_IDS.get(ref.get("id", "")) != ref.get("name"):
                problems.append(f"{node['name']}: {kind} credential {ref!r} is not one devstack.n8n creates "
                                f"({KNOWN_CREDENTIAL_IDS})")
    return problems


def hardcoded_addresses(workflow: dict[str, Any]) -> list[str]:
    """URLs must come from $env (services run on free ports in tests), never a literal host:port."""
    return [f"{path}: {value}" for path, _key, value in _walk(workflow.get("nodes", []), "$.nodes")
            if isinstance(value, str) and LOCAL_ADDRESS.search(value) and "$env" not in value]


FILES = workflow_files()


def test_there_are_workflows_and_the_smoke_one_is_among_them():
    paths = {f.path.name for f in FILES}
    assert "smoke.json" in paths
    webhook_paths = {n["parameters"].get("path") for f in FILES for n in f.data["nodes"]
                     if n["type"] == "n8n-nodes-base.webhook"}
    assert SMOKE_WEBHOOK_PATH in webhook_paths
    assert len(FILES) == len(list(WORKFLOWS_DIR.glob("*.json")))


@pytest.mark.parametrize("wf", FILES, ids=[f.path.name for f in FILES])
def test_workflow_file_holds_no_secret(wf: WorkflowFile):
    assert find_secrets(wf.data) == []
    assert credential_problems(wf.data) == []
    assert hardcoded_addresses(wf.data) == []


@pytest.mark.parametrize("wf", FILES, ids=[f.path.name for f in FILES])
def test_every_expression_is_one_template(wf: WorkflowFile):
    """In every `={{ ... }}` expression the braces inside balance: a `}}` inside the JavaScript would end the
    expression early, and n8n would fail at run time with 'invalid syntax'."""
    for where, _, value in _walk(wf.data):
        if isinstance(value, str) and value.startswith("="):
            for m in re.finditer(r"\{\{(.*?)\}\}", value, re.S):
                assert m.group(1).count("{") == m.group(1).count("}"), f"{where}: {m.group(0)[:120]}"


def test_the_scanner_catches_planted_secrets():
    smoke = json.loads((WORKFLOWS_DIR / "smoke.json").read_text())
    assert find_secrets(smoke) == [] and credential_problems(smoke) == [] and hardcoded_addresses(smoke) == []
    planted = json.loads(json.dumps(smoke))
    http = next(n for n in planted["nodes"] if n["type"] == "n8n-nodes-base.httpRequest")
    http["parameters"]["headerParameters"]["parameters"].append(
        {"name": "Authorization", "value": "Bearer test-n8n-0123456789abcdef01234567"})
    http["parameters"]["url"] = "http://127.0.0.1:8100/v1/whoami"
    http["parameters"]["options"]["note"] = "sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    http["parameters"]["apiKey"] = "k3Jq9vXw2LmN8pRt5YzB7cDf4GhS6aUe1oIi0"
    http["credentials"]["httpHeaderAuth"]["data"] = {"value": "x"}
    found = "\n".join(find_secrets(planted))
    for reason in ("literal value for Authorization", "bearer token", "Anthropic key", "literal value for apiKey",
                   "high-entropy string", "Metis token"):
        assert reason in found, (reason, found)
    assert credential_problems(planted)
    assert hardcoded_addresses(planted)


def test_run_data_is_decoded_from_n8ns_flatted_form():
    """n8n stores an execution's run data as `flatted` JSON: element 0 is the root and, inside objects and
    arrays, every string is the index of another element. A shared value comes back as one object, a cycle
    does not recurse forever, numbers / booleans / null stay inline."""
    from devstack.n8n import unflatten

    flat = [{"resultData": "1", "version": 1}, {"runData": "2", "lastNodeExecuted": "3", "error": None},
            {"Open run": "4", "Finish run": "4"}, "Finish run", ["5"], {"executionTime": 12, "ok": True, "self": "5"}]
    run = unflatten(flat)
    result = run["resultData"]
    assert run["version"] == 1 and result["lastNodeExecuted"] == "Finish run" and result["error"] is None
    assert {name: len(runs) for name, runs in result["runData"].items()} == {"Open run": 1, "Finish run": 1}
    assert result["runData"]["Open run"] is result["runData"]["Finish run"]  # shared, not copied
    task = result["runData"]["Open run"][0]
    assert task["executionTime"] == 12 and task["ok"] is True and task["self"] is task  # the cycle is the object
    assert unflatten(None) == {} and unflatten([]) == {}
