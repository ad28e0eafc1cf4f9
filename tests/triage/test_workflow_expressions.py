"""Static checks of the triage workflows: every service call goes through the n8n credential and env URLs
(every workflow's expressions are checked in tests/e2e/test_workflow_files.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "n8n" / "workflows").glob("triage-*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_service_call_uses_the_n8n_credential_and_env_urls(path: Path) -> None:
    doc = json.loads(path.read_text())
    for node in doc["nodes"]:
        if node["type"] == "n8n-nodes-base.httpRequest":
            assert node["parameters"]["url"].startswith("={{ $env.METIS_"), node["name"]
            assert node["credentials"] == {"httpHeaderAuth": {"id": "metisN8nToken01", "name": "Metis n8n token"}}
