"""Optional LLM verification through the real anthropic SDK against the Anthropic emulator (by URL)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from flask import Flask

from shared.settings import Secret
from tests.conftest import auth

from .conftest import index
from .test_api import CORPUS, QUERY

pytestmark = pytest.mark.xdist_group("dedupe")


@pytest.fixture
def llm_app(make_app: Callable[..., Flask], emu: Any, tmp_path: Path) -> Flask:
    cfg = yaml.safe_load(Path("config/dedupe.yaml").read_text())
    cfg["llm"]["enabled"] = True
    cfg["verdict"]["possible"] = 0.001  # make sure the paraphrase reaches verification (p is a probability)
    (tmp_path / "dedupe.yaml").write_text(yaml.safe_dump(cfg))
    return make_app(config_dir=str(tmp_path), own_token=Secret(emu.anthropic_key),
                    extra={"METIS_DEDUPE_LLM": "on", "METIS_DEDUPE_LLM_BASE_URL": emu.anthropic_url})


def test_llm_confirms_a_duplicate_with_structured_output(llm_app: Flask, emu: Any) -> None:
    c = llm_app.test_client()
    index(c, CORPUS)
    emu.script_anthropic([{"tool_input": {"duplicate_of": "HAD-1", "confidence": 0.93,
                                          "rationale": "Both report the NPE in getFileStatus for a missing path."}}])
    body = c.post("/v1/duplicates", json={"ticket": QUERY, "run_id": "run-42"}, headers=auth("n8n")).get_json()
    assert body["mode"] == "llm" and body["verdict"] == "duplicate"
    assert body["llm"]["duplicate_of"] == "HAD-1"
    [call] = emu.anthropic_requests("/v1/messages")
    req = call["body"]
    assert req["tool_choice"] == {"type": "tool", "name": "report_verdict"}
    assert req["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert '<ticket role="new">' in req["messages"][0]["content"]
    assert {k.lower(): v for k, v in call["headers"].items()}.get("x-metis-run-id") == "run-42"


def test_llm_rejection_downgrades_and_no_run_means_no_call(llm_app: Flask, emu: Any) -> None:
    c = llm_app.test_client()
    index(c, CORPUS)
    emu.script_anthropic([{"tool_input": {"duplicate_of": None, "confidence": 0.8, "rationale": "different"}}])
    body = c.post("/v1/duplicates", json={"ticket": QUERY, "run_id": "run-1"}, headers=auth("n8n")).get_json()
    assert body["mode"] == "llm" and body["verdict"] == "possible" and body["candidates"]
    body = c.post("/v1/duplicates", json={"ticket": QUERY}, headers=auth("n8n")).get_json()
    assert body["mode"] == "offline" and "no run_id" in body["mode_detail"]
    assert len(emu.anthropic_requests("/v1/messages")) == 1


def test_budget_denial_and_bad_answers_fall_back_to_offline(llm_app: Flask, emu: Any) -> None:
    c = llm_app.test_client()
    index(c, CORPUS)
    offline = c.post("/v1/duplicates", json={"ticket": QUERY}, headers=auth("n8n")).get_json()
    emu.script_anthropic([{"status": 403, "message": "daily budget exhausted", "error_type": "permission_error"}])
    body = c.post("/v1/duplicates", json={"ticket": QUERY, "run_id": "run-2"}, headers=auth("n8n")).get_json()
    assert body["mode"] == "offline" and "denied" in body["mode_detail"]
    assert body["verdict"] == offline["verdict"] and body["candidates"] == offline["candidates"]
    # A model naming a ticket that was not offered is rejected, not trusted.
    emu.script_anthropic([{"tool_input": {"duplicate_of": "PAY-999", "confidence": 0.99, "rationale": "x"}}])
    body = c.post("/v1/duplicates", json={"ticket": QUERY, "run_id": "run-3"}, headers=auth("n8n")).get_json()
    assert body["mode"] == "offline" and "failed" in body["mode_detail"]
