"""LLM verification through the real guardrails gateway: charged to the run, and a budget denial leaves the
offline verdict standing (a real dedupe gunicorn process, the real gateway, the Anthropic emulator)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml

from devstack.processes import Proc, free_port, start_service, wait_http
from devstack.stack import service_env
from tests.conftest import TEST_TOKENS, auth

from .test_api import CORPUS, QUERY

pytestmark = pytest.mark.xdist_group("dedupe")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dedupe_llm(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A dedupe process with LLM verification on, calling the session's guardrails gateway."""
    config_dir = tmp_path_factory.mktemp("dedupe-llm-config")
    shutil.copytree(ROOT / "config", config_dir, dirs_exist_ok=True)
    cfg = yaml.safe_load((config_dir / "dedupe.yaml").read_text())
    cfg["llm"]["enabled"] = True
    (config_dir / "dedupe.yaml").write_text(yaml.safe_dump(cfg))
    env = service_env("dedupe", base=os.environ, database_url=services.database_url, tokens=TEST_TOKENS,
                      urls=services.urls, externals=services.externals, config_dir=str(config_dir))
    env["METIS_DEDUPE_LLM"] = "on"
    proc = start_service("dedupe", env=env, port=free_port(), log_dir=tmp_path_factory.mktemp("dedupe-llm"),
                         workers=1)
    wait_http(proc, "/readyz", timeout=180)
    yield proc
    proc.stop()


@pytest.fixture
def project(dedupe_llm: Proc) -> str:
    """The test corpus, indexed under a project of its own (every test empties the database after it)."""
    tag = "LLM" + uuid.uuid4().hex[:6].upper()
    tickets = [{**t, "key": f"{tag}-{t['key']}", "project": tag} for t in CORPUS]
    r = requests.post(dedupe_llm.url + "/v1/tickets", json={"tickets": tickets}, headers=auth("n8n"), timeout=60)
    assert r.status_code == 200, r.text
    return tag


def open_run(services: Any, task: str = "dedupe") -> str:
    r = services.post("guardrails", "/v1/runs", caller="n8n",
                      json={"task": task, "trigger": "event", "workflow": "test", "external_id": uuid.uuid4().hex})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def check(proc: Proc, project: str, run_id: str | None) -> dict[str, Any]:
    body = {"ticket": {**QUERY, "project": project}, "filters": {"project": [project]}, "limit": 3,
            **({"run_id": run_id} if run_id else {})}
    r = requests.post(proc.url + "/v1/duplicates", json=body, headers=auth("n8n"), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_verification_is_charged_to_the_run(services: Any, dedupe_llm: Proc, project: str, emu: Any) -> None:
    offline = check(dedupe_llm, project, None)
    assert offline["verdict"] == "possible" and offline["mode"] == "offline"  # the paraphrase reaches verification
    best = offline["candidates"][0]["key"]
    emu.script_anthropic([{"tool_input": {"duplicate_of": best, "confidence": 0.9, "rationale": "same NPE"}}])
    run_id = open_run(services)
    body = check(dedupe_llm, project, run_id)
    assert body["mode"] == "llm" and body["verdict"] == "duplicate" and body["llm"]["duplicate_of"] == best
    [call] = emu.anthropic_requests("/v1/messages")
    assert call["body"]["model"] == "claude-haiku-4-5"
    assert "x-metis-run-id" not in {k.lower() for k in call["headers"]}  # guardrails' header stays in guardrails
    budget = services.get("guardrails", f"/v1/runs/{run_id}", caller="ops").json()["budget"]
    assert 0 < budget["spent_usd"] < 0.01  # one cheap call, settled by guardrails at its real usage


def test_budget_denial_leaves_the_offline_verdict(services: Any, dedupe_llm: Proc, project: str, emu: Any) -> None:
    offline = check(dedupe_llm, project, None)
    run_id = open_run(services, task="e2e-capped")  # a run cap far below the call's worst case
    body = check(dedupe_llm, project, run_id)
    assert body["mode"] == "offline" and "denied by guardrails" in body["mode_detail"], body
    assert body["verdict"] == offline["verdict"] == "possible" and body["candidates"] == offline["candidates"]
    assert body["llm"] is None
    assert emu.anthropic_requests("/v1/messages") == []  # nothing reached the model
    assert services.get("guardrails", f"/v1/runs/{run_id}", caller="ops").json()["budget"]["spent_usd"] == 0
