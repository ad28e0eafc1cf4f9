"""The gateway's lean WSGI path does what the shared Flask hooks do for every other route: request ids, auth,
no-store, HTTP metrics, log fields; anything else on these paths still reaches Flask."""
from __future__ import annotations

import logging
import os
import re
import uuid

import requests
from prometheus_client.parser import text_string_to_metric_families

from shared.logs import REQUEST_FIELDS, ContextFilter
from tests.conftest import TEST_TOKENS

HAIKU = "claude-haiku-4-5"
BODY = {"model": HAIKU, "max_tokens": 32, "messages": [{"role": "user", "content": "One word, please."}]}
PATH = "/anthropic/v1/messages"


def _headers(run_id: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": TEST_TOKENS["triage"].get(), "X-Metis-Run-Id": run_id, "anthropic-version": "2023-06-01",
            **extra}


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(url + "/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _requests_total(samples: dict, status: str) -> float:
    key = ("metis_http_requests_total", (("endpoint", PATH), ("method", "POST"), ("service", "guardrails"),
                                         ("status", status)))
    return samples.get(key, 0.0)


def _latency_count(samples: dict) -> float:
    return samples.get(("metis_http_request_duration_seconds_count", (("endpoint", PATH), ("service", "guardrails"))),
                       0.0)


def test_answer_carries_request_id_no_store_worker_and_exact_length(gw, emu):
    run = gw.client("triage").open_run("triage", trigger="event")
    r = requests.post(gw.url + PATH, json=BODY, headers=_headers(run.id, **{"X-Request-Id": "req-42.a:b"}),
                      timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["X-Request-Id"] == "req-42.a:b"
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["X-Metis-Worker"] == str(os.getpid())
    assert int(r.headers["Content-Length"]) == len(r.content)
    assert r.headers["Content-Type"].startswith("application/json")
    assert int(r.headers["X-Metis-Cost-Micros"]) > 0 and "X-Metis-Remaining-Run-USD" in r.headers
    assert r.json()["type"] == "message"
    # A malformed request id is replaced by a fresh one, as on every other route.
    r2 = requests.post(gw.url + PATH, json=BODY, headers=_headers(run.id, **{"X-Request-Id": "bad id <script>"}),
                       timeout=10)
    assert r2.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", r2.headers["X-Request-Id"])


def test_bad_or_missing_token_is_refused_in_anthropic_shape_and_nothing_is_reserved(gw, emu, sql):
    run = gw.client("triage").open_run("triage", trigger="event")
    for headers in ({"x-api-key": "not-a-token-of-anyone", "X-Metis-Run-Id": run.id},
                    {"Authorization": "Bearer also-wrong-token-here", "X-Metis-Run-Id": run.id},
                    {"X-Metis-Run-Id": run.id}):
        r = requests.post(gw.url + PATH, json=BODY, headers=headers, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["x-should-retry"] == "false"
        assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Request-Id"]
    # The bearer form (the SDK's auth_token=) is accepted like x-api-key.
    ok = requests.post(gw.url + PATH, json=BODY, timeout=10, headers={
        "Authorization": f"Bearer {TEST_TOKENS['triage'].get()}", "X-Metis-Run-Id": run.id})
    assert ok.status_code == 200, ok.text
    assert sql.execute("SELECT count(*) AS n FROM guardrails.reservations WHERE run_id = %s",
                       (run.id,)).fetchone()["n"] == 1
    assert len(emu.anthropic_requests("/v1/messages")) == 1


def test_http_metrics_count_gateway_calls_with_the_route_as_endpoint(gw, emu):
    run = gw.client("triage").open_run("triage", trigger="event")
    before = _samples(gw.url)
    for _ in range(3):
        assert requests.post(gw.url + PATH, json=BODY, headers=_headers(run.id), timeout=10).status_code == 200
    assert requests.post(gw.url + PATH, json=BODY, headers={"x-api-key": "wrong-token-xxxxxxxx"},
                         timeout=10).status_code == 401
    # An unknown run: a 404 denial.
    assert requests.post(gw.url + PATH, json=BODY, headers=_headers(str(uuid.uuid4())), timeout=10).status_code == 404
    after = _samples(gw.url)
    assert _requests_total(after, "200") - _requests_total(before, "200") == 3
    assert _requests_total(after, "401") - _requests_total(before, "401") == 1
    assert _requests_total(after, "404") - _requests_total(before, "404") == 1
    assert _latency_count(after) - _latency_count(before) == 5


def test_other_methods_and_paths_still_reach_flask(gw):
    r = requests.get(gw.url + PATH, headers={"x-api-key": TEST_TOKENS["triage"].get()}, timeout=5)
    assert r.status_code == 405
    assert r.headers["Content-Type"].startswith("application/problem+json")
    r = requests.get(gw.url + "/v1/whoami", headers={"Authorization": f"Bearer {TEST_TOKENS['triage'].get()}",
                                                    "X-Request-Id": "who-1"}, timeout=5)
    assert r.status_code == 200 and r.json()["caller"] == "triage" and r.json()["request_id"] == "who-1"


def test_log_records_outside_flask_carry_the_fast_path_request_fields():
    f = ContextFilter("guardrails")
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "msg", None, None)
    token = REQUEST_FIELDS.set({"request_id": "rid-1", "n8n_execution_id": "77", "caller": "triage"})
    try:
        assert f.filter(rec)
    finally:
        REQUEST_FIELDS.reset(token)
    assert (rec.request_id, rec.n8n_execution_id, rec.caller, rec.service) == ("rid-1", "77", "triage", "guardrails")
    plain = logging.LogRecord("x", logging.WARNING, __file__, 1, "msg", None, None)
    assert f.filter(plain) and not hasattr(plain, "request_id")
