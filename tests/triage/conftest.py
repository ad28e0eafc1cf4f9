"""Triage test fixtures: the real configuration, evidence factories and an SDK caller aimed at the emulator."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import anthropic
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from services.triage import service
from services.triage.config import Taxonomy, TriageConfig, default_model, load_prices, load_taxonomy, load_triage_config
from services.triage.prompt import build_prefix, build_tool

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"


@pytest.fixture(scope="session")
def taxonomy() -> Taxonomy:
    return load_taxonomy(CONFIG / "taxonomy.yaml")


@pytest.fixture(scope="session")
def cfg(taxonomy: Taxonomy) -> TriageConfig:
    return load_triage_config(CONFIG / "triage.yaml", taxonomy)


@pytest.fixture(scope="session")
def prices() -> dict[str, dict[str, float]]:
    return load_prices(CONFIG)


def neighbour(key: str, score: float, *, category: str | None = None, priority: str | None = None,
              component: str | None = None, resolution: str = "Fixed by correcting the configuration.",
              summary: str = "A similar resolved ticket", url: str | None = None) -> dict[str, Any]:
    """One item as dedupe's /v1/similar returns it."""
    return {"key": key, "score": score, "summary": summary, "resolution": resolution, "status": "Resolved",
            "priority": priority, "components": [component] if component else [],
            "labels": [f"category-{category}"] if category else [], "url": url}


@pytest.fixture
def make_deps(taxonomy: Taxonomy, cfg: TriageConfig, prices: dict[str, dict[str, float]]) -> Callable[..., service.TriageDeps]:
    """TriageDeps with given evidence (the retrieval results are data here; dedupe's HTTP path is tested elsewhere)."""

    def factory(similar: list[dict[str, Any]] | None = None, duplicates: dict[str, Any] | None = None,
                llm: Callable[[str], service.MessagesCreate] | None = None) -> service.TriageDeps:
        return service.TriageDeps(
            taxonomy=taxonomy, cfg=cfg, prefix=build_prefix(taxonomy, cfg), tool=build_tool(taxonomy, cfg),
            model=default_model(CONFIG, cfg), prices=prices,
            similar=lambda t: list(similar or []), duplicates=lambda t: duplicates, llm=llm)

    return factory


def sdk_caller(base_url: str, api_key: str) -> Callable[[str], service.MessagesCreate]:
    """A Messages API caller using the real `anthropic` SDK against a URL (the emulator here)."""

    def for_run(run_id: str) -> service.MessagesCreate:
        client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0,
                                     default_headers={"X-Metis-Run-Id": run_id})

        def create(**kwargs: Any) -> tuple[Any, float | None]:
            return client.messages.create(**kwargs), None

        return create

    return for_run


def ticket(key: str = "PAY-2001", summary: str = "Kiosk clock-in times are one hour late", description: str = "",
           **extra: Any) -> dict[str, Any]:
    return {"key": key, "summary": summary, "description": description, **extra}


TRIAGE_WORKFLOWS = ("metisTriageJira01", "metisTriagePoll01")


FLOW_WEBHOOKS = ("metis-triage-jira", "metis-triage-poll", "metis-approval-request")


@pytest.fixture(scope="session")
def flow_webhooks(stack: Any) -> None:
    """Wait until n8n serves the flows' webhooks: n8n is ready once its smoke webhook answers, but it registers the
    other workflows' webhooks one by one, and a delivery before that is a 404. The CORS preflight (OPTIONS with
    an Origin) asks n8n whether a path is registered without running the workflow."""
    deadline = time.monotonic() + 60
    for path in FLOW_WEBHOOKS:
        while True:
            r = requests.options(f"{stack.n8n.url}/webhook/{path}", timeout=10, headers={
                "Origin": "http://probe.invalid", "Access-Control-Request-Method": "POST"})
            if r.status_code == 204:
                break
            assert time.monotonic() < deadline, f"n8n does not serve /webhook/{path}: {r.status_code} {r.text[:200]}"
            time.sleep(0.2)


@pytest.fixture
def quiet_n8n(request: pytest.FixtureRequest, flow_webhooks: None) -> Any:
    """Before a flow test, n8n serves the flows' webhooks; after it, wait until its n8n executions have ended,
    so none writes into the next test."""
    yield
    n8n = request.getfixturevalue("stack").n8n
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        busy = [e for wid in TRIAGE_WORKFLOWS for e in n8n.executions(wid)
                if e["status"] not in ("success", "error", "crashed", "canceled")]
        if not busy:
            return
        time.sleep(0.2)
    raise AssertionError(f"n8n executions still running after the test: {busy}")


def answered(services: Any, service_name: str, method: str, endpoint: str) -> dict[str, float]:
    """How many requests to `method endpoint` a service has answered so far, by status (its own counter)."""
    text = services.get(service_name, "/metrics", caller=None).text
    return {s.labels["status"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "metis_http_requests_total" and s.labels.get("endpoint") == endpoint
            and s.labels.get("method") == method}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """What changed between two `answered` readings (statuses with no new requests left out)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def seed_history(services: Any) -> None:
    """Resolved, labelled tickets in dedupe so the offline vote is confident and proposes (category leave)."""
    history = [{"key": f"HIST-{i}", "summary": f"Annual leave balance negative after the accrual run {i}",
                "description": "Employees show negative leave balances after the nightly accrual job.",
                "status": "Resolved", "resolution": "Fixed", "resolution_text": "Reverted the doubled accrual run.",
                "priority": "Critical", "components": ["leave-engine"], "labels": ["category-leave"],
                "project": "HIST", "created": "2025-01-01T10:00:00+00:00"} for i in range(6)]
    deadline = time.monotonic() + 180  # dedupe answers 503 until its embedding model is loaded
    while services.get("dedupe", "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "dedupe not ready"
        time.sleep(0.2)
    assert services.post("dedupe", "/v1/tickets", caller="ops", json={"tickets": history}).status_code == 200
