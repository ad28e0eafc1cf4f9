"""The common app factory: auth, problem+json, request ids, health, OpenAPI — for every service."""
from __future__ import annotations

import importlib
import json

import pytest

from shared.settings import Secret, Settings, SettingsError
from tests.conftest import SERVICES, auth


@pytest.fixture(params=SERVICES)
def service_client(request, make_settings):
    name = request.param
    module = importlib.import_module(f"services.{name}.app")
    app = module.create_app(make_settings(name))
    app.testing = True
    yield name, app.test_client()
    app.extensions["metis"].pool.close()


def test_health_is_public_and_names_the_service(service_client):
    name, client = service_client
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ok", "service": name}


def test_readyz_checks_the_database(service_client):
    _, client = service_client
    r = client.get("/readyz")
    body = r.get_json()
    assert body["checks"]["database"] == "ok"
    # Ready only when every dependency is; a service-specific check (model loading, a source not
    # configured in this bare test app) may legitimately hold readiness back, and must say why.
    all_ok = all(v == "ok" for v in body["checks"].values())
    assert r.status_code == (200 if all_ok else 503)
    assert body["status"] == ("ok" if all_ok else "unavailable")
    assert all(v == "ok" or v.startswith("failed: ") for v in body["checks"].values())


def test_readyz_fails_when_the_database_is_unreachable(make_settings):
    from shared.web import create_service_app

    settings = make_settings("watch", database_url="postgresql://postgres@127.0.0.1:1/none?connect_timeout=1")
    app = create_service_app(settings, apis=[], migrate=False)
    r = app.test_client().get("/readyz")
    assert r.status_code == 503
    assert r.get_json()["checks"]["database"].startswith("failed: ")
    app.extensions["metis"].pool.close()


def test_missing_token_is_401_problem_json(service_client):
    _, client = service_client
    r = client.get("/v1/whoami")
    assert r.status_code == 401
    assert r.mimetype == "application/problem+json"
    body = r.get_json()
    assert body["code"] == "unauthorized" and "Authorization" in body["detail"]


def test_wrong_token_and_wrong_scheme_are_401(service_client):
    _, client = service_client
    for header in ("Bearer not-a-real-token-at-all", "Basic dXNlcjpwYXNz", "Bearer "):
        r = client.get("/v1/whoami", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.get_json()["code"] == "unauthorized"


def test_each_caller_is_identified_by_its_own_token(service_client):
    name, client = service_client
    for caller in ("n8n", "ops", "triage"):
        r = client.get("/v1/whoami", headers=auth(caller))
        assert r.status_code == 200
        assert r.get_json()["caller"] == caller
        assert r.get_json()["service"] == name


def test_request_and_execution_ids_are_propagated(service_client):
    _, client = service_client
    r = client.get("/v1/whoami", headers={**auth(), "X-Request-Id": "req-123", "X-N8N-Execution-Id": "4711"})
    assert r.headers["X-Request-Id"] == "req-123"
    assert r.get_json()["request_id"] == "req-123"
    assert r.get_json()["n8n_execution_id"] == "4711"
    # A hostile request id is replaced, never echoed into logs or headers.
    r = client.get("/v1/whoami", headers={**auth(), "X-Request-Id": "bad id<script>"})
    assert r.headers["X-Request-Id"] != "bad id<script>"
    assert len(r.headers["X-Request-Id"]) == 32


def test_unknown_route_and_wrong_method_are_problem_json(service_client):
    _, client = service_client
    r = client.get("/v1/no-such-thing", headers=auth())
    assert r.status_code == 404 and r.mimetype == "application/problem+json"
    assert r.get_json()["code"] == "not_found"
    r = client.delete("/healthz")
    assert r.status_code == 405 and r.mimetype == "application/problem+json"
    assert "GET" in r.headers["Allow"]


def test_openapi_is_generated_from_schemas(service_client):
    name, client = service_client
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/whoami" in spec["paths"]
    ref = spec["paths"]["/v1/whoami"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ref["$ref"].endswith("/WhoAmIRead")
    assert "caller" in spec["components"]["schemas"]["WhoAmIRead"]["properties"]


def test_metrics_count_requests(service_client):
    name, client = service_client
    client.get("/healthz")
    text = client.get("/metrics").get_data(as_text=True)
    assert f'metis_http_requests_total{{endpoint="/healthz",method="GET",service="{name}",status="200"}}' in text


def test_settings_fail_fast_listing_every_problem():
    with pytest.raises(SettingsError) as exc:
        Settings.from_env("triage", {"METIS_TOKEN_N8N": "short", "METIS_TRIAGE_PORT": "x"})
    msg = str(exc.value)
    assert "DATABASE_URL" in msg and "METIS_TRIAGE_PORT" in msg and "shorter than 16" in msg


def test_secrets_never_print(make_settings):
    s = make_settings("triage")
    text = repr(s) + str(s.caller_tokens) + json.dumps({k: str(v) for k, v in s.caller_tokens.items()})
    for secret in s.caller_tokens.values():
        assert secret.get() not in text
    assert repr(Secret("hunter2hunter2hunter2")) == "Secret('**********')"
