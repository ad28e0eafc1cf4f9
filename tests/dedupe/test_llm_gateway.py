"""LLM verification through the real guardrails gateway: charged to the run, and a budget denial leaves the
offline verdict standing (a real dedupe gunicorn process, the real gateway, the Anthropic emulator)."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from devstack.processes import Proc, free_port, start_service, wait_http
from devstack.stack import service_env
from services.dedupe.config import copy_with_llm_enabled
from tests.conftest import TEST_TOKENS, auth

from .test_api import CORPUS, QUERY

pytestmark = pytest.mark.xdist_group("dedupe")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dedupe_llm(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A dedupe process with LLM verification on, calling the session's guardrails gateway."""
    config_dir = copy_with_llm_enabled(ROOT / "config", tmp_path_factory.mktemp("dedupe-llm-config"))
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


def test_a_hesitant_confirmation_is_not_a_duplicate(services: Any, dedupe_llm: Proc, project: str, emu: Any) -> None:
    """The model names a candidate but below llm.min_confidence (0.8): no "duplicate" (so no link proposal),
    the verdict stays "possible" with the model's answer shown for a human; at the threshold it is a duplicate."""
    best = check(dedupe_llm, project, None)["candidates"][0]["key"]
    emu.script_anthropic([{"tool_input": {"duplicate_of": best, "confidence": 0.79, "rationale": "probably"}},
                          {"tool_input": {"duplicate_of": best, "confidence": 0.8, "rationale": "same NPE"}}])
    hesitant = check(dedupe_llm, project, open_run(services))
    assert (hesitant["mode"], hesitant["verdict"]) == ("llm", "possible"), hesitant
    assert hesitant["llm"] == {"duplicate_of": best, "confidence": 0.79, "rationale": "probably"}
    assert f"named {best} with confidence 0.79, below llm.min_confidence 0.80" in hesitant["mode_detail"]
    sure = check(dedupe_llm, project, open_run(services))
    assert (sure["mode"], sure["verdict"], sure["llm"]["duplicate_of"]) == ("llm", "duplicate", best), sure
    assert len(emu.anthropic_requests("/v1/messages")) == 2


def test_budget_denial_leaves_the_offline_verdict(services: Any, dedupe_llm: Proc, project: str, emu: Any) -> None:
    offline = check(dedupe_llm, project, None)
    run_id = open_run(services, task="e2e-capped")  # a run cap far below the call's worst case
    body = check(dedupe_llm, project, run_id)
    assert body["mode"] == "offline" and "denied by guardrails" in body["mode_detail"], body
    assert body["verdict"] == offline["verdict"] == "possible" and body["candidates"] == offline["candidates"]
    assert body["llm"] is None
    assert emu.anthropic_requests("/v1/messages") == []  # nothing reached the model
    assert services.get("guardrails", f"/v1/runs/{run_id}", caller="ops").json()["budget"]["spent_usd"] == 0


def test_evaluation_with_llm_verification_opens_a_run_per_query(services: Any, emu: Any, tmp_path: Path,
                                                                 database_url: str) -> None:
    """`metis dedupe evaluate --llm`: the service started for the evaluation verifies through the real gateway,
    each query in a guardrails run of its own; an LLM-confirmed "duplicate" is scored on the ticket the model
    named, and what guardrails charged is reported. A refused run leaves that query's offline verdict standing."""
    from services.dedupe.cli import run_evaluation

    from .test_evaluation import write_dataset

    issues, pairs = write_dataset(tmp_path)
    project = "EVLLM" + uuid.uuid4().hex[:4].upper()
    # The first duplicate query is confirmed (naming its true duplicate); every other verification finds none.
    new_200 = '<ticket role=\\"new\\">\\nkey: ' + f"{project}-200"
    emu.script_anthropic([
        {"match": new_200, "tool_input": {"duplicate_of": f"{project}-100", "confidence": 0.93,
                                          "rationale": "both: NameNode out of memory on block reports"}},
        {"tool_input": {"duplicate_of": None, "confidence": 0.8, "rationale": "different problems"}, "times": 200},
    ], replace=True)
    env = {"METIS_TOKEN_DEDUPE": TEST_TOKENS["dedupe"].get(), "METIS_DB_POOL_MAX": "4"}
    rep = run_evaluation(issues_csv=issues, pairs_csv=pairs, url=None, token=None, database_url=database_url,
                         workers=1, extra_env=env, llm=True, guardrails_url=services.urls["METIS_GUARDRAILS_URL"],
                         guardrails_token=TEST_TOKENS["ops"].get(), project=project)
    results = {r["key"]: r for r in rep["results"]}
    first = results[f"{project}-200"]
    assert (first["mode"], first["verdict"], first["named"], first["named_correct"]) == \
        ("llm", "duplicate", f"{project}-100", True)
    verified = [r for r in rep["results"] if r["mode"] == "llm"]
    assert len(verified) == len(emu.anthropic_requests("/v1/messages")) >= 2
    assert all(r["verdict"] == "possible" for r in verified if r["key"] != first["key"])
    assert all(r["verdict"] == "none" and r["cost_usd"] == 0 for r in rep["results"] if r["mode"] == "offline")
    summary = rep["llm"]["all"]
    assert (summary["verified"], summary["charged"], summary["said_duplicate"], summary["named_a_true_duplicate"]) \
        == (len(verified), len(verified), 1, 1)
    assert summary["precision_of_llm_duplicates"] == 1.0 and rep["verdict"]["all"]["dup_said"] == 1
    assert rep["llm"]["run_refusals"] == {}
    # One finished guardrails run per query, charged exactly what the report says.
    runs = [r for r in services.get("guardrails", "/v1/runs?task=dedupe&limit=500", caller="ops").json()
            if (r.get("external_id") or "").startswith(f"eval:{project}-")]
    assert len(runs) == len(rep["results"]) and {r["status"] for r in runs} == {"succeeded"}
    charged = sum(r["budget"]["spent_usd"] for r in runs)
    assert charged > 0 and abs(charged - summary["cost_usd_total"]) < 1e-6

    # With the kill switch engaged every run is refused: counted, and the queries keep their offline verdicts.
    engaged = services.post("guardrails", "/v1/kill-switch/engage", caller="ops",
                            json={"actor": "test", "reason": "evaluation refusal"})
    assert engaged.status_code == 200, engaged.text
    try:
        calls = len(emu.anthropic_requests("/v1/messages"))
        again = run_evaluation(issues_csv=issues, pairs_csv=pairs, url=None, token=None, database_url=database_url,
                               workers=1, extra_env=env, llm=True, guardrails_url=services.urls["METIS_GUARDRAILS_URL"],
                               guardrails_token=TEST_TOKENS["ops"].get())
    finally:
        services.post("guardrails", "/v1/kill-switch/release", caller="ops", json={"actor": "test", "reason": "done"})
    assert again["llm"]["run_refusals"] == {"kill_switch_engaged": len(again["results"])}
    assert {r["mode"] for r in again["results"]} == {"offline"} and again["llm"]["all"]["verified"] == 0
    assert again["verdict"]["all"]["dup_said"] == 0
    assert len(emu.anthropic_requests("/v1/messages")) == calls


def test_an_aborted_evaluation_leaves_no_run_open(services: Any, tmp_path: Path) -> None:
    """If a query fails (here: the 'dedupe' URL is a service without /v1/duplicates), the evaluation stops with
    the error and the run it opened for that query is finished as failed, not left open."""
    from services.dedupe.evaluation import Client, GuardrailsRuns, load_dataset, run_queries

    from .test_evaluation import write_dataset

    data = load_dataset(*write_dataset(tmp_path), prefix="EVABORT" + uuid.uuid4().hex[:4].upper())
    guardrails, token = services.urls["METIS_GUARDRAILS_URL"], TEST_TOKENS["ops"].get()
    with pytest.raises(RuntimeError, match="POST /v1/duplicates"):
        run_queries(Client(guardrails, token), data, "EVABORT", runs=GuardrailsRuns(guardrails, token))
    prefix = f"eval:{data.queries[0][0]}"
    runs = [r for r in services.get("guardrails", "/v1/runs?task=dedupe&limit=1000", caller="ops").json()
            if r["external_id"] == prefix]
    assert len(runs) == 1 and runs[0]["status"] == "failed", runs
    assert "POST /v1/duplicates" in runs[0]["outcome"]["error"]
