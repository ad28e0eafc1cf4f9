"""The smoke workflow through real n8n: webhook → guardrails GET /v1/whoami with the n8n credential → response."""
from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest
import requests

from devstack.n8n import (SMOKE_WEBHOOK_PATH, SMOKE_WORKFLOW_ID, TOKEN_CREDENTIAL_ID, webhook_paths,
                          webhook_registered, workflow_files)
from tests.conftest import TEST_TOKENS

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("n8n")]


def test_webhook_calls_guardrails_as_n8n_with_the_execution_id(n8n, services):
    r = n8n.webhook(SMOKE_WEBHOOK_PATH, json={"hello": "metis"})
    assert r.status_code == 200, r.text
    seen = r.json()
    # What guardrails saw: the caller its bearer token maps to, and the execution id header n8n sent.
    assert seen["service"] == "guardrails"
    assert seen["caller"] == "n8n"
    assert re.fullmatch(r"\d+", seen["n8n_execution_id"] or ""), seen
    run = n8n.wait_for_execution(seen["n8n_execution_id"], statuses=("success",))
    assert run["workflow_id"] == SMOKE_WORKFLOW_ID
    assert run["mode"] == "webhook"
    # The id is per execution, not a constant: a second call carries the next execution's id.
    again = n8n.webhook(SMOKE_WEBHOOK_PATH, json={}).json()
    assert again["n8n_execution_id"] != seen["n8n_execution_id"]
    assert {e["id"] for e in n8n.executions(SMOKE_WORKFLOW_ID)} >= {seen["n8n_execution_id"], again["n8n_execution_id"]}
    # And guardrails counted those authenticated calls in its own metrics.
    metrics = requests.get(services.url("guardrails") + "/metrics", timeout=10).text
    m = re.search(r'metis_http_requests_total\{endpoint="/v1/whoami",method="GET",service="guardrails",'
                  r'status="200"\} (\d+)', metrics)
    assert m and int(m.group(1)) >= 2, metrics[:1500]


def test_every_workflow_webhook_is_served_once_the_fixture_is_ready(n8n):
    # n8n registers webhooks one by one after start-up; readiness waits for all of them, so the first
    # delivery to any flow is never a 404.
    paths = webhook_paths(workflow_files())
    assert {"metis-triage-jira", SMOKE_WEBHOOK_PATH} <= paths
    assert [p for p in sorted(paths) if not webhook_registered(n8n.url, p)] == []
    assert not webhook_registered(n8n.url, "metis-no-such-webhook")


def test_the_service_token_lives_only_in_an_encrypted_credential(n8n):
    token = TEST_TOKENS["n8n"].get()
    # Not in n8n's environment (workflows can read $env) ...
    environ = Path(f"/proc/{n8n.proc.popen.pid}/environ").read_bytes()
    assert token.encode() not in environ
    assert b"METIS_GUARDRAILS_URL=" in environ
    # n8n's own secrets come from *_FILE settings, so $env cannot read them back either.
    assert b"N8N_ENCRYPTION_KEY=" not in environ and b"N8N_ENCRYPTION_KEY_FILE=" in environ
    assert b"DB_POSTGRESDB_PASSWORD=" not in environ
    # ... and stored encrypted: the credential row exists but never holds the token in clear.
    with psycopg.connect(n8n.database_url) as conn:
        row = conn.execute("SELECT type, data FROM credentials_entity WHERE id = %s", (TOKEN_CREDENTIAL_ID,)).fetchone()
    assert row is not None and row[0] == "httpHeaderAuth"
    assert token not in row[1] and "Bearer" not in row[1]


def test_unknown_webhook_is_a_404_not_a_hang(n8n):
    r = n8n.webhook("metis-no-such-hook", json={})
    assert r.status_code == 404


def test_owner_can_log_in_to_the_editor_api(n8n):
    session = n8n.login()
    r = session.get(f"{n8n.url}/rest/workflows", timeout=30)
    assert r.status_code == 200, r.text
    listed = {w["id"]: w for w in r.json()["data"]}
    assert listed[SMOKE_WORKFLOW_ID]["active"] is True
