"""The LLM gateway with the real anthropic SDK against the Anthropic emulator: policy, caps, settlement, faults."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import anthropic
import psycopg
import pytest
import requests

from services.guardrails.gateway import worst_case_micros
from shared.guardrails_client import BudgetDenied
from tests.conftest import TEST_TOKENS

HAIKU = "claude-haiku-4-5"
MSG = [{"role": "user", "content": "Summarise ticket PAY-1 in one line."}]


def _reservations(sql, run_id):
    return sql.execute("SELECT state, amount_micros, cost_micros FROM guardrails.reservations WHERE run_id = %s "
                       "ORDER BY created_at", (run_id,)).fetchall()


def _cap(sql, key):
    return sql.execute("SELECT * FROM guardrails.caps WHERE key = %s", (key,)).fetchone()


def test_call_is_forwarded_unchanged_and_costed(gw, emu, sql):
    c = gw.client("triage")
    run = c.open_run("triage", trigger="event", external_id="exec-1")
    raw = c.anthropic(run.id).messages.with_raw_response.create(model=HAIKU, max_tokens=64, messages=MSG)
    msg = raw.parse()
    seen = emu.anthropic_requests("/v1/messages")
    assert len(seen) == 1
    # The emulator received our request with the real key, not the service token.
    assert seen[0]["body"]["messages"] == MSG
    assert TEST_TOKENS["triage"].get() not in json.dumps(seen[0]["headers"])
    assert msg.id == seen[0]["response"]["id"]
    usage = seen[0]["response"]["usage"]
    expected = -(-(usage["input_tokens"] * 1000 + usage["output_tokens"] * 5000) // 1000)
    assert int(raw.headers["x-metis-cost-micros"]) == expected
    assert raw.headers["x-metis-remaining-run-usd"] == f"0.{500000 - expected:06d}"
    res = _reservations(sql, run.id)
    assert [r["state"] for r in res] == ["settled"] and res[0]["cost_micros"] == expected
    run_after = c.get_run(run.id)
    assert run_after.budget["spent_micros"] == expected and run_after.budget["reserved_micros"] == 0


def test_settlement_prices_every_token_kind(gw, emu, sql):
    # Scripted usage: 1000 uncached, 2000 written to the 5m cache, 3000 to the 1h cache, 4000 read, 500 out.
    emu.script_anthropic([{"usage": {"input_tokens": 1000, "output_tokens": 500, "cache_read_input_tokens": 4000,
                                     "cache_creation_input_tokens": 5000,
                                     "cache_creation": {"ephemeral_5m_input_tokens": 2000,
                                                        "ephemeral_1h_input_tokens": 3000}}}])
    c = gw.client("triage")
    run = c.open_run("triage", trigger="manual")
    raw = c.anthropic(run.id).messages.with_raw_response.create(model="claude-sonnet-4-6", max_tokens=600,
                                                                messages=MSG)
    # Sonnet 4.6 per token in nano-USD: input 3000, output 15000, 5m 3750, 1h 6000, read 300.
    nanos = 1000 * 3000 + 500 * 15000 + 2000 * 3750 + 3000 * 6000 + 4000 * 300
    assert int(raw.headers["x-metis-cost-micros"]) == nanos // 1000 == 37_200
    entry = sql.execute("SELECT data FROM guardrails.audit_log WHERE kind = 'llm.call'").fetchone()["data"]
    assert entry["usage"] == {"input": 1000, "output": 500, "cache_write_5m": 2000, "cache_write_1h": 3000,
                              "cache_read": 4000}
    assert entry["cost_nanos_by_kind"] == {"input": 3_000_000, "output": 7_500_000, "cache_write_5m": 7_500_000,
                                           "cache_write_1h": 18_000_000, "cache_read": 1_200_000}
    assert entry["cache_hit_tokens"] == 4000 and entry["cost_micros"] == 37_200
    text = requests.get(gw.url + "/metrics", timeout=5).text
    assert 'metis_llm_tokens_total{kind="cache_read",model="claude-sonnet-4-6",task="triage"} 4000.0' in text
    # Cache reads saved (3000 - 300) nano-USD per token versus the uncached price.
    assert 'metis_llm_cache_savings_usd_total{model="claude-sonnet-4-6",task="triage"} 0.0108' in text


def test_missing_max_tokens_is_refused_before_any_reservation(gw, emu, sql):
    run = gw.client().open_run("triage", trigger="event")
    r = requests.post(gw.url + "/anthropic/v1/messages", json={"model": HAIKU, "messages": MSG},
                      headers={"x-api-key": TEST_TOKENS["triage"].get(), "X-Metis-Run-Id": run.id,
                               "anthropic-version": "2023-06-01"}, timeout=5)
    assert r.status_code == 400
    assert r.json()["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    assert r.headers["x-should-retry"] == "false"
    assert _reservations(sql, run.id) == [] and emu.anthropic_requests() == []


@pytest.mark.parametrize("body,message", [
    ({"model": HAIKU, "max_tokens": 8, "messages": []}, "messages: at least one message is required"),
    ({"model": HAIKU, "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]},
     "messages.0.role: Input should be 'user' or 'assistant'"),
    ({"model": HAIKU, "max_tokens": 0, "messages": MSG},
     "max_tokens: Input should be a valid integer greater than or equal to 1"),
    ({"model": HAIKU, "max_tokens": 8, "messages": MSG, "temperature": 3},
     "temperature: Input should be a number between 0 and 1"),
    ({"max_tokens": 8, "messages": MSG}, "model: Field required"),
])
def test_malformed_requests_get_anthropics_400_before_any_reservation(gw, emu, sql, body, message):
    run = gw.client().open_run("triage", trigger="event")
    r = requests.post(gw.url + "/anthropic/v1/messages", json=body, timeout=5,
                      headers={"x-api-key": TEST_TOKENS["triage"].get(), "X-Metis-Run-Id": run.id})
    assert (r.status_code, r.json()["error"]["type"], r.json()["error"]["message"]) == \
        (400, "invalid_request_error", message)
    assert _reservations(sql, run.id) == [] and emu.anthropic_requests() == []


def test_bearer_and_x_api_key_are_accepted_and_bad_keys_get_anthropic_401(gw, emu):
    run = gw.client().open_run("triage", trigger="event")
    body = {"model": HAIKU, "max_tokens": 16, "messages": MSG}
    base = {"X-Metis-Run-Id": run.id, "anthropic-version": "2023-06-01"}
    ok1 = requests.post(gw.url + "/anthropic/v1/messages", json=body, timeout=5,
                        headers={**base, "x-api-key": TEST_TOKENS["triage"].get()})
    ok2 = requests.post(gw.url + "/anthropic/v1/messages", json=body, timeout=5,
                        headers={**base, "Authorization": f"Bearer {TEST_TOKENS['triage'].get()}"})
    assert ok1.status_code == ok2.status_code == 200
    bad = requests.post(gw.url + "/anthropic/v1/messages", json=body, timeout=5,
                        headers={**base, "x-api-key": emu.anthropic_key})  # the real key is not a Metis token
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(api_key="nope-nope-nope-nope", base_url=gw.url + "/anthropic", max_retries=0,
                            default_headers={"X-Metis-Run-Id": run.id}).messages.create(
            model=HAIKU, max_tokens=16, messages=MSG)


def test_unknown_run_is_404_and_missing_run_header_is_400(gw, emu):
    c = gw.client()
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(api_key=TEST_TOKENS["triage"].get(), base_url=gw.url + "/anthropic", max_retries=0,
                            default_headers={"X-Metis-Run-Id": str(uuid.uuid4())}).messages.create(
            model=HAIKU, max_tokens=16, messages=MSG)
    with pytest.raises(anthropic.BadRequestError, match="X-Metis-Run-Id"):
        anthropic.Anthropic(api_key=TEST_TOKENS["triage"].get(), base_url=gw.url + "/anthropic",
                            max_retries=0).messages.create(model=HAIKU, max_tokens=16, messages=MSG)
    assert c.kill_switch()["engaged"] is False
    assert emu.anthropic_requests() == []


def test_model_policy_denials_are_typed_and_never_retried(gw, emu, sql):
    c = gw.client("triage")
    run = c.open_run("triage", trigger="event")
    with pytest.raises(BudgetDenied) as exc:
        c.anthropic(run.id, max_retries=5).messages.create(model="claude-opus-4-5", max_tokens=16, messages=MSG)
    assert exc.value.reason == "model_not_allowed" and exc.value.status == 403
    # One request reached guardrails (no SDK retry), none reached Anthropic, nothing reserved.
    denied = sql.execute("SELECT count(*) AS n FROM guardrails.audit_log WHERE kind = 'llm.denied'").fetchone()
    assert denied["n"] == 1 and emu.anthropic_requests() == [] and _reservations(sql, run.id) == []

    # Scheduled runs only get cheap models even when the task allows more.
    sched = c.open_run("digest", trigger="schedule")
    with pytest.raises(BudgetDenied) as exc:
        c.anthropic(sched.id).messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)
    assert exc.value.reason == "model_tier_not_allowed"
    assert c.anthropic(sched.id).messages.create(model=HAIKU, max_tokens=16, messages=MSG).usage.output_tokens > 0


def test_a_model_past_its_retirement_date_is_refused_before_any_money_or_upstream_call(make_guardrails, emu, sql):
    # Haiku 4.5 "retired" yesterday, Sonnet 4.6 only tomorrow: the first is refused, the second still works.
    today = datetime.now(timezone.utc).date()
    gw = make_guardrails({"models": {"retirements": {"claude-haiku-4-5": (today - timedelta(days=1)).isoformat(),
                                                     "claude-sonnet-4-6": (today + timedelta(days=1)).isoformat()}}},
                         anthropic_url=emu.anthropic_url, anthropic_key=emu.anthropic_key)
    c = gw.client("triage")
    run = c.open_run("triage", trigger="manual")
    with pytest.raises(BudgetDenied) as exc:
        c.anthropic(run.id, max_retries=5).messages.create(model="claude-haiku-4-5-20251001", max_tokens=16,
                                                           messages=MSG)
    assert exc.value.reason == "model_retired" and exc.value.status == 403
    assert (today - timedelta(days=1)).isoformat() in str(exc.value)
    assert emu.anthropic_requests() == [] and _reservations(sql, run.id) == []
    assert c.anthropic(run.id).messages.create(model="claude-sonnet-4-6", max_tokens=16,
                                               messages=MSG).usage.output_tokens > 0
    assert any("claude-haiku-4-5" in w and "was retired" in w for w in gw.policy.retirement_warnings(today))
    assert any("claude-sonnet-4-6" in w and "retires" in w for w in gw.policy.retirement_warnings(today))


def test_top_tier_needs_policy_and_justification(gw, emu):
    ops = gw.client("ops")
    run = ops.open_run("investigate", trigger="manual")
    with pytest.raises(BudgetDenied) as exc:
        ops.anthropic(run.id).messages.create(model="claude-opus-4-5", max_tokens=16, messages=MSG)
    assert exc.value.reason == "justification_required"
    msg = ops.anthropic(run.id, justification="Payroll run failed for 3 clients; need root cause").messages.create(
        model="claude-opus-4-5", max_tokens=16, messages=MSG)
    assert msg.model == "claude-opus-4-5"
    # A task whose policy lacks allow_top_tier is refused even with a justification.
    trun = ops.open_run("triage", trigger="manual")
    with pytest.raises(BudgetDenied) as exc:
        ops.anthropic(trun.id, justification="x" * 50).messages.create(model="claude-opus-4-5", max_tokens=16,
                                                                        messages=MSG)
    assert exc.value.reason == "model_not_allowed"


def _cost_of_one(gw, max_tokens: int, body_len_hint: int = 0) -> int:
    body = json.dumps({"model": HAIKU, "max_tokens": max_tokens, "messages": MSG}).encode()
    p = gw.policy
    return worst_case_micros(p.prices[HAIKU], len(body) + p.request_overhead_tokens + body_len_hint, max_tokens)


@pytest.mark.parametrize("level,policy,reason", [
    ("run", {"tasks": {"triage": {"run_cap": {"usd": 0.02, "tokens": 200000}}}}, "run_cap_exhausted"),
    ("run_tokens", {"tasks": {"triage": {"run_cap": {"usd": 0.5, "tokens": 5000}}}}, "run_token_cap_exhausted"),
    ("task_daily", {"tasks": {"triage": {"daily_usd": 0.03, "run_cap": {"usd": 0.03, "tokens": 200000}}}},
     "task_daily_cap_exhausted"),
    ("daily", {"limits": {"daily_usd": 0.04}, "tasks": {"triage": {"daily_usd": 0.04,
                                                                    "run_cap": {"usd": 0.04, "tokens": 10 ** 6}}}},
     "daily_cap_exhausted"),
    ("monthly", {"limits": {"daily_usd": 0.05, "monthly_usd": 0.05},
                 "tasks": {"triage": {"daily_usd": 0.05, "run_cap": {"usd": 0.05, "tokens": 10 ** 6}}}},
     "monthly_cap_exhausted"),
])
def test_caps_at_every_level(make_guardrails, emu, sql, level, policy, reason):
    gw = make_guardrails(policy, anthropic_url=emu.anthropic_url, anthropic_key=emu.anthropic_key)
    c = gw.client("triage")
    run = c.open_run("triage", trigger="event")
    llm = c.anthropic(run.id)
    # Every call really uses all 1000 output tokens (~5000 micro-USD), close to its worst case (~5500).
    emu.script_anthropic([{"output_tokens": 1000, "times": 100}])
    calls = 0
    with pytest.raises(BudgetDenied) as exc:
        for _ in range(50):
            llm.messages.create(model=HAIKU, max_tokens=1000, messages=MSG)
            calls += 1
    assert exc.value.reason == reason, exc.value
    assert calls >= 2
    caps = sql.execute("SELECT * FROM guardrails.caps").fetchall()
    for cap in caps:
        assert cap["spent_micros"] + cap["reserved_micros"] <= cap["limit_micros"], cap
        assert cap["reserved_micros"] == 0
    # The denial said which cap; the worst case of the refused call really did not fit it.
    detail = exc.value.body["error"]["details"]
    assert detail["reserve_micros"] > 0 and detail["cap"]
    # Ops hear once per period cap that work is being refused (run caps are the normal end of a run).
    with pytest.raises(BudgetDenied):
        llm.messages.create(model=HAIKU, max_tokens=1000, messages=MSG)
    alerts = sql.execute("SELECT kind, payload FROM guardrails.alert_outbox WHERE kind = 'cap_exhausted'").fetchall()
    if level.startswith("run"):
        assert alerts == []
    else:
        assert len(alerts) == 1 and alerts[0]["payload"]["scope"] == level


def test_upstream_429_is_passed_back_and_releases(gw, emu, sql):
    emu.script_anthropic([{"status": 429, "retry_after": 0, "times": 1}])
    c = gw.client("triage")
    run = c.open_run("triage", trigger="event")
    # The SDK's own retry handles the 429: the second attempt succeeds.
    msg = c.anthropic(run.id, max_retries=2).messages.create(model=HAIKU, max_tokens=32, messages=MSG)
    assert msg.content
    res = _reservations(sql, run.id)
    assert [r["state"] for r in res] == ["released", "settled"]
    assert res[0]["cost_micros"] == 0
    emu.script_anthropic([{"status": 529, "times": 1}])
    with pytest.raises(anthropic.InternalServerError) as exc:
        c.anthropic(run.id, max_retries=0).messages.create(model=HAIKU, max_tokens=32, messages=MSG)
    assert exc.value.status_code == 529
    assert [r["state"] for r in _reservations(sql, run.id)] == ["released", "settled", "released"]
    assert c.get_run(run.id).budget["reserved_micros"] == 0


def test_upstream_without_an_answer_is_charged_the_worst_case(make_guardrails, emu, sql):
    gw = make_guardrails(anthropic_url=emu.anthropic_url, anthropic_key=emu.anthropic_key,
                         extra={"METIS_ANTHROPIC_TIMEOUT": "0.3"})
    emu.script_anthropic([{"delay_seconds": 1.0, "times": 1}])
    c = gw.client("triage")
    run = c.open_run("triage", trigger="event")
    with pytest.raises(anthropic.APIStatusError) as exc:
        c.anthropic(run.id, max_retries=0).messages.create(model=HAIKU, max_tokens=32, messages=MSG)
    assert exc.value.status_code == 504
    (res,) = _reservations(sql, run.id)
    # The call may have been billed: never under-count.
    assert res["state"] == "settled" and res["cost_micros"] == res["amount_micros"] > 0


def test_unbounded_input_is_refused(gw, emu):
    c = gw.client("triage")
    run = c.open_run("triage", trigger="event")
    with pytest.raises(BudgetDenied) as exc:
        c.anthropic(run.id).messages.create(model=HAIKU, max_tokens=32, messages=MSG,
                                            tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert exc.value.reason == "unbounded_input"


def test_count_tokens_is_forwarded(gw, emu):
    c = gw.client("triage")
    run = c.open_run("triage", trigger="event")
    n = c.anthropic(run.id).messages.count_tokens(model=HAIKU, messages=MSG)
    assert n.input_tokens > 0
    assert emu.anthropic_requests("/v1/messages/count_tokens")[0]["status"] == 200


def test_database_down_fails_closed(make_guardrails, emu, database_url, tmp_path):
    """A guardrails whose PostgreSQL refuses connections refuses LLM calls and never forwards them."""
    name = f"metis_gr_down_{uuid.uuid4().hex[:8]}"
    admin = database_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = database_url.rsplit("/", 1)[0] + "/" + name
    try:
        gw = make_guardrails(anthropic_url=emu.anthropic_url, anthropic_key=emu.anthropic_key, database_url=url)
        c = gw.client("triage")
        run = c.open_run("triage", trigger="event")
        assert c.anthropic(run.id).messages.create(model=HAIKU, max_tokens=16, messages=MSG).content
        before = len(emu.anthropic_requests("/v1/messages"))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            # Wait (up to 5 s each) until the backends have really exited: without a timeout the call only signals
            # them, and a pooled connection could still serve one more query (a reservation the database took).
            conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s", (name,))
        with pytest.raises(anthropic.InternalServerError) as exc:
            c.anthropic(run.id, max_retries=1).messages.create(model=HAIKU, max_tokens=16, messages=MSG)
        assert exc.value.status_code == 503
        assert exc.value.body["error"]["details"]["error_code"] == "ledger_unavailable"
        assert len(emu.anthropic_requests("/v1/messages")) == before
        opened = requests.post(gw.url + "/v1/runs", json={"task": "triage", "trigger": "event"},
                               headers={"Authorization": f"Bearer {TEST_TOKENS['triage'].get()}"}, timeout=10)
        assert opened.status_code == 503 and opened.json()["code"] == "ledger_unavailable"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        # Back up: calls flow again (the pool replaces its dead connections).
        for _ in range(20):
            try:
                c.anthropic(run.id, max_retries=0).messages.create(model=HAIKU, max_tokens=16, messages=MSG)
                break
            except anthropic.InternalServerError:
                continue
        else:
            pytest.fail("gateway did not recover after the database came back")
    finally:
        gw.pool.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_streamed_calls_are_relayed_and_settled_from_the_stream_usage(gw, emu, sql):
    emu.script_anthropic([{"text": "Payroll tax table is stale for client ACME.", "times": 2,
                           "usage": {"input_tokens": 120, "cache_read_input_tokens": 2000,
                                     "cache_creation_input_tokens": 0, "output_tokens": 30}}])
    c = gw.client("triage")
    run = c.open_run("triage", trigger="event")
    llm = c.anthropic(run.id)
    with llm.messages.stream(model=HAIKU, max_tokens=200, messages=MSG) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Payroll tax table is stale for client ACME." and final.usage.output_tokens == 30
    events = [e.type for e in llm.messages.create(model=HAIKU, max_tokens=200, messages=MSG, stream=True)]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    res = _reservations(sql, run.id)
    # haiku 4.5: 120 x 1000 + 2000 x 100 + 30 x 5000 nano-USD = 470 micro-USD each, far below the reservation.
    assert [(r["state"], r["cost_micros"]) for r in res] == [("settled", 470), ("settled", 470)]
    assert all(r["amount_micros"] > 470 for r in res)
    entry = sql.execute("SELECT data FROM guardrails.audit_log WHERE kind = 'llm.call' ORDER BY seq LIMIT 1"
                        ).fetchone()["data"]
    assert entry["stream"] is True and entry["cache_hit_tokens"] == 2000
    assert c.get_run(run.id).budget["reserved_micros"] == 0
