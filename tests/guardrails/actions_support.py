"""Helpers for the actions / approvals tests: guardrails in-process over real HTTP, with its write connectors
pointed at the Jira and Slack emulators (as `make up` points them)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

import psycopg
import pytest
import requests
from psycopg.rows import dict_row

from services.guardrails.executors import Executors
from shared.settings import Secret
from tests.conftest import auth

from .conftest import Guardrails


@dataclass
class Writes:
    """A guardrails with write connectors, the emulators behind them, and shortcuts for the tests."""

    gr: Guardrails
    emu: Any
    database_url: str

    @property
    def url(self) -> str:
        return self.gr.url

    @property
    def svc(self) -> Any:
        return self.gr.state["actions"]

    def call(self, method: str, path: str, caller: str | None = "triage", **kwargs: Any) -> requests.Response:
        headers = {**(auth(caller) if caller else {}), **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def open_run(self, task: str = "triage") -> str:
        r = self.call("POST", "/v1/runs", json={"task": task, "trigger": "manual", "workflow": "test",
                                                "external_id": uuid.uuid4().hex})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def propose(self, run_id: str, operation: str, target: str, payload: dict[str, Any], *, key: str | None = None,
                connector: str = "jira", caller: str = "triage", **extra: Any) -> requests.Response:
        body = {"run_id": run_id, "connector": connector, "operation": operation, "target": target,
                "payload": payload, "idempotency_key": key or uuid.uuid4().hex, "reason": "test", **extra}
        return self.call("POST", "/v1/actions", caller=caller, json=body)

    def decide(self, action_id: str, decision: str = "approve", approver: str = "alice@example.com",
               caller: str = "n8n", **extra: Any) -> requests.Response:
        headers = extra.pop("headers", {})
        body = {"decision": decision, "approver": approver, "channel": "test", **extra}
        return self.call("POST", f"/v1/actions/{action_id}/decision", caller=caller, json=body, headers=headers)

    def issue(self, project: str = "SUP", summary: str = "Kiosk clock-in one hour late") -> str:
        return str(self.emu.jira_seed([{"project": project, "summary": summary}])[0])

    def comments(self, key: str) -> list[dict[str, Any]]:
        return list(self.emu.jira_state()["comments"].get(key, []))

    def audit(self, **params: Any) -> list[dict[str, Any]]:
        r = self.call("GET", "/v1/audit", caller="ops", params={"limit": 1000, **params})
        assert r.status_code == 200, r.text
        return list(r.json())

    def kinds(self, action_id: str) -> list[str]:
        return [e["kind"] for e in self.audit(kind="action.*") if e["data"].get("action_id") == action_id]

    def sql(self, query: str, *args: Any) -> list[dict[str, Any]]:
        with psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row) as conn:
            cur = conn.execute(query, args)
            return list(cur.fetchall()) if cur.description else []


def emulator_executors(emu: Any) -> Executors:
    return Executors(jira_url=emu.jira_url, jira_email=emu.jira_user, jira_token=Secret(emu.jira_token),
                     slack_webhook_url=Secret(emu.slack_webhook_url()))


@pytest.fixture
def make_writes(make_guardrails: Callable[..., Guardrails], emu: Any,
                database_url: str) -> Callable[..., Writes]:
    """Factory: guardrails with policy overrides and emulator-backed write connectors."""

    def factory(policy: dict[str, Any] | None = None, **kwargs: Any) -> Writes:
        gr = make_guardrails(policy, **kwargs)
        gr.state["actions"].executors = emulator_executors(emu)
        return Writes(gr, emu, database_url)

    return factory


@pytest.fixture
def writes(make_writes: Callable[..., Writes]) -> Writes:
    """Guardrails with the repository's allowlist (config/policy.yaml) and write connectors."""
    return make_writes()
