"""The Anthropic emulator driven by the official `anthropic` SDK (and raw HTTP where the SDK cannot err)."""
from __future__ import annotations

import json
import math
import time
from typing import Any

import anthropic
import pytest
import requests

from tests.fixtures.emulators import Emulators

SONNET = "claude-sonnet-4-6"   # minimum cacheable prefix 1024 tokens
HAIKU = "claude-haiku-4-5"     # minimum cacheable prefix 4096 tokens
WORDS = "payroll award interpretation overtime penalty rate roster shift allowance leave accrual "


def client(emu: Emulators, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(api_key=kw.pop("api_key", emu.anthropic_key), base_url=emu.anthropic_url, **kw)


def big_text(tokens: int) -> str:
    """Text that the emulator counts as exactly `tokens` tokens (4 chars each)."""
    return (WORDS * (tokens * 4 // len(WORDS) + 1))[: tokens * 4]


def cached_system(tokens: int, ttl: str | None = None) -> list[dict[str, Any]]:
    cc: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        cc["ttl"] = ttl
    return [{"type": "text", "text": big_text(tokens), "cache_control": cc}]


def raw(emu: Emulators, body: Any, *, path: str = "/v1/messages", key: str | None = None,
        version: str | None = "2023-06-01") -> requests.Response:
    headers = {"content-type": "application/json"}
    if key is not False:
        headers["x-api-key"] = key or emu.anthropic_key
    if version:
        headers["anthropic-version"] = version
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(emu.anthropic_url + path, data=data, headers=headers, timeout=10)


# ------------------------------------------------------------------ basics

def test_plain_reply_has_usage_and_ids(emu: Emulators) -> None:
    msg = client(emu).messages.create(model=SONNET, max_tokens=200, messages=[{"role": "user", "content": "Hello there"}])
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason == "end_turn"
    u = msg.usage
    assert u.input_tokens > 0 and u.output_tokens == math.ceil(len(msg.content[0].text) / 4)
    assert u.cache_creation_input_tokens == 0 and u.cache_read_input_tokens == 0
    assert u.cache_creation is not None and u.cache_creation.ephemeral_5m_input_tokens == 0


def test_count_tokens_matches_uncached_input(emu: Emulators) -> None:
    c = client(emu)
    kwargs: dict[str, Any] = dict(model=SONNET, system="You are terse.",
                                  messages=[{"role": "user", "content": "How many tokens is this?"}])
    counted = c.messages.count_tokens(**kwargs).input_tokens
    created = c.messages.create(max_tokens=50, **kwargs).usage.input_tokens
    assert counted == created > 0


def test_count_is_bounded_by_body_bytes(emu: Emulators) -> None:
    tool = {"name": "classify", "description": "Classify ünïcode ticket ✓",
            "input_schema": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 1e3}}}}
    body = {"model": SONNET, "messages": [{"role": "user", "content": "é" * 1000}], "tools": [tool],
            "tool_choice": {"type": "auto"}}
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    r = raw(emu, data, path="/v1/messages/count_tokens")
    info = emu.anthropic_info()
    assert r.status_code == 200
    assert r.json()["input_tokens"] <= len(data) + info["tool_use_system_prompt_tokens"]["auto"]


def test_bad_key_is_401_in_anthropic_shape(emu: Emulators) -> None:
    with pytest.raises(anthropic.AuthenticationError) as exc:
        client(emu, api_key="sk-ant-wrong").messages.create(model=SONNET, max_tokens=10,
                                                            messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 401
    r = raw(emu, {"model": SONNET, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, key=False)
    assert r.status_code == 401
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["request-id"].startswith("req_") and r.json()["request_id"] == r.headers["request-id"]


@pytest.mark.parametrize("body,fragment", [
    ({"model": SONNET, "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
    ({"model": SONNET, "max_tokens": 10, "messages": []}, "at least one message"),
    ({"model": SONNET, "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]}, 'Unexpected role "system"'),
    ({"model": SONNET, "max_tokens": 10, "messages": [{"role": "bot", "content": "x"}]}, "role"),
    ({"model": SONNET, "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, "non-empty"),
    ({"model": SONNET, "max_tokens": 999999, "messages": [{"role": "user", "content": "x"}]}, "maximum allowed number of output tokens"),
    ({"model": SONNET, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
      "tool_choice": {"type": "tool", "name": "nope"}, "tools": [{"name": "a", "input_schema": {"type": "object"}}]}, "not found"),
])
def test_validation_errors_are_400_invalid_request(emu: Emulators, body: dict[str, Any], fragment: str) -> None:
    r = raw(emu, body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert fragment in err["error"]["message"]


def test_missing_version_header_and_bad_json(emu: Emulators) -> None:
    r = raw(emu, {"model": SONNET, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, version=None)
    assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
    r = raw(emu, b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404(emu: Emulators) -> None:
    with pytest.raises(anthropic.NotFoundError) as exc:
        client(emu).messages.create(model="claude-nonexistent-9", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_dated_and_alias_models_accepted(emu: Emulators) -> None:
    c = client(emu)
    for model in ("claude-haiku-4-5-20251001", "claude-opus-4-1-20250805", "claude-opus-4-5", "claude-opus-4-8"):
        assert c.messages.create(model=model, max_tokens=20, messages=[{"role": "user", "content": "x"}]).model == model
    assert any(m.id == HAIKU for m in c.models.list())
    with pytest.raises(anthropic.NotFoundError), pytest.warns(DeprecationWarning):  # retired upstream
        c.messages.create(model="claude-3-5-haiku-20241022", max_tokens=20, messages=[{"role": "user", "content": "x"}])


def test_max_tokens_caps_output(emu: Emulators) -> None:
    msg = client(emu).messages.create(model=SONNET, max_tokens=3, messages=[{"role": "user", "content": "x"}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
    assert len(msg.content[0].text) <= 12  # type: ignore[union-attr]


# ------------------------------------------------------------------ prompt caching

def test_cache_write_then_read_then_expiry(emu: Emulators) -> None:
    c = client(emu)
    system = cached_system(2000)
    ask = [{"role": "user", "content": "Summarise the policy."}]
    first = c.messages.create(model=SONNET, max_tokens=50, system=system, messages=ask).usage
    total = c.messages.count_tokens(model=SONNET, system=system, messages=ask).input_tokens
    assert first.cache_read_input_tokens == 0
    assert first.cache_creation_input_tokens >= 2000
    assert first.cache_creation.ephemeral_5m_input_tokens == first.cache_creation_input_tokens  # type: ignore[union-attr]
    assert first.input_tokens + first.cache_creation_input_tokens == total

    second = c.messages.create(model=SONNET, max_tokens=50, system=system, messages=ask).usage
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert second.cache_creation_input_tokens == 0 and second.input_tokens == first.input_tokens

    emu.advance_anthropic_clock(200)  # a hit refreshes the 5-minute TTL ...
    assert c.messages.create(model=SONNET, max_tokens=50, system=system, messages=ask).usage.cache_read_input_tokens > 0
    emu.advance_anthropic_clock(200)  # ... so 400 s after the write it is still alive
    assert c.messages.create(model=SONNET, max_tokens=50, system=system, messages=ask).usage.cache_read_input_tokens > 0
    emu.advance_anthropic_clock(301)  # idle for more than 5 minutes: gone, written again
    again = c.messages.create(model=SONNET, max_tokens=50, system=system, messages=ask).usage
    assert again.cache_read_input_tokens == 0 and again.cache_creation_input_tokens == first.cache_creation_input_tokens


def test_one_hour_ttl(emu: Emulators) -> None:
    c = client(emu)
    system = cached_system(1500, ttl="1h")
    ask = [{"role": "user", "content": "Go."}]
    first = c.messages.create(model=SONNET, max_tokens=20, system=system, messages=ask).usage
    assert first.cache_creation.ephemeral_1h_input_tokens == first.cache_creation_input_tokens > 0  # type: ignore[union-attr]
    assert first.cache_creation.ephemeral_5m_input_tokens == 0  # type: ignore[union-attr]
    emu.advance_anthropic_clock(1800)
    assert c.messages.create(model=SONNET, max_tokens=20, system=system, messages=ask).usage.cache_read_input_tokens > 0
    emu.advance_anthropic_clock(3601)
    assert c.messages.create(model=SONNET, max_tokens=20, system=system, messages=ask).usage.cache_read_input_tokens == 0


def test_minimum_cacheable_length_depends_on_model(emu: Emulators) -> None:
    c = client(emu)
    system = cached_system(2000)  # above Sonnet's 1024, below Haiku 4.5's 4096
    ask = [{"role": "user", "content": "Go."}]
    for _ in range(2):
        h = c.messages.create(model=HAIKU, max_tokens=20, system=system, messages=ask).usage
        assert h.cache_creation_input_tokens == 0 and h.cache_read_input_tokens == 0
    assert c.messages.create(model=SONNET, max_tokens=20, system=system, messages=ask).usage.cache_creation_input_tokens > 0
    big = cached_system(4200)
    assert c.messages.create(model=HAIKU, max_tokens=20, system=big, messages=ask).usage.cache_creation_input_tokens >= 4096
    assert emu.anthropic_info()["models"][HAIKU]["min_cacheable_tokens"] == 4096


def test_cache_is_keyed_by_api_key_and_model(emu: Emulators) -> None:
    system = cached_system(1500)
    ask = [{"role": "user", "content": "Go."}]
    client(emu).messages.create(model=SONNET, max_tokens=20, system=system, messages=ask)
    other_key = client(emu, api_key=emu.anthropic_alt_key).messages.create(model=SONNET, max_tokens=20, system=system, messages=ask)
    assert other_key.usage.cache_read_input_tokens == 0 and other_key.usage.cache_creation_input_tokens > 0
    other_model = client(emu).messages.create(model="claude-opus-4-8", max_tokens=20, system=system, messages=ask)
    assert other_model.usage.cache_read_input_tokens == 0


def test_prefix_order_tools_system_messages(emu: Emulators) -> None:
    """A breakpoint on the system prompt caches tools + system; changing a tool invalidates it."""
    c = client(emu)
    tool = {"name": "lookup", "description": big_text(600), "input_schema": {"type": "object", "properties": {}}}
    system = cached_system(600)
    ask = [{"role": "user", "content": "Go."}]
    first = c.messages.create(model=SONNET, max_tokens=20, tools=[tool], system=system, messages=ask).usage  # type: ignore[list-item]
    assert first.cache_creation_input_tokens > 1200  # tools (+ tool system prompt) + system
    changed = dict(tool, description=big_text(601))
    second = c.messages.create(model=SONNET, max_tokens=20, tools=[changed], system=system, messages=ask).usage  # type: ignore[list-item]
    assert second.cache_read_input_tokens == 0 and second.cache_creation_input_tokens > 1200


def test_multi_turn_breakpoint_moves_forward_and_reads_earlier_prefix(emu: Emulators) -> None:
    c = client(emu)
    turn1 = [{"role": "user", "content": [{"type": "text", "text": big_text(1500), "cache_control": {"type": "ephemeral"}}]}]
    u1 = c.messages.create(model=SONNET, max_tokens=20, messages=turn1).usage  # type: ignore[arg-type]
    assert u1.cache_creation_input_tokens > 1500
    turn2 = [{"role": "user", "content": [{"type": "text", "text": big_text(1500)}]},
             {"role": "assistant", "content": "Noted."},
             {"role": "user", "content": [{"type": "text", "text": "And now the follow-up question " * 10,
                                           "cache_control": {"type": "ephemeral"}}]}]
    u2 = c.messages.create(model=SONNET, max_tokens=20, messages=turn2).usage  # type: ignore[arg-type]
    assert u2.cache_read_input_tokens == u1.cache_creation_input_tokens  # found by the 20-block lookback
    assert u2.cache_creation_input_tokens > 0 and u2.input_tokens < 10


def test_two_breakpoints_split_creation_by_ttl(emu: Emulators) -> None:
    c = client(emu)
    system = [{"type": "text", "text": big_text(1200), "cache_control": {"type": "ephemeral", "ttl": "1h"}},
              {"type": "text", "text": big_text(800), "cache_control": {"type": "ephemeral", "ttl": "5m"}}]
    u = c.messages.create(model=SONNET, max_tokens=20, system=system, messages=[{"role": "user", "content": "x"}]).usage  # type: ignore[arg-type]
    assert u.cache_creation.ephemeral_1h_input_tokens >= 1200  # type: ignore[union-attr]
    assert u.cache_creation.ephemeral_5m_input_tokens == 800  # type: ignore[union-attr]
    assert u.cache_creation_input_tokens == u.cache_creation.ephemeral_1h_input_tokens + 800  # type: ignore[union-attr]


def test_more_than_four_breakpoints_is_400(emu: Emulators) -> None:
    system = [{"type": "text", "text": f"block {i}", "cache_control": {"type": "ephemeral"}} for i in range(5)]
    with pytest.raises(anthropic.BadRequestError) as exc:
        client(emu).messages.create(model=SONNET, max_tokens=20, system=system, messages=[{"role": "user", "content": "x"}])  # type: ignore[arg-type]
    assert "maximum of 4 blocks with cache_control" in str(exc.value)


def test_one_hour_after_five_minutes_is_400(emu: Emulators) -> None:
    system = [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    with pytest.raises(anthropic.BadRequestError):
        client(emu).messages.create(model=SONNET, max_tokens=20, system=system, messages=[{"role": "user", "content": "x"}])  # type: ignore[arg-type]


# ------------------------------------------------------------------ tools

TRIAGE_TOOL = {
    "name": "record_triage",
    "description": "Record the triage decision.",
    "input_schema": {
        "type": "object",
        "properties": {
            "category": {"type": "string", "enum": ["payroll", "rostering", "leave", "integration"]},
            "priority": {"type": "string", "enum": ["Blocker", "High", "Medium", "Low"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "similar": {"type": "array", "items": {"type": "string", "pattern": "^[A-Z]+-[0-9]+$"}, "minItems": 1},
            "summary": {"type": "string", "minLength": 20, "maxLength": 200},
            "retries": {"type": "integer", "minimum": 2, "maximum": 7},
            "meta": {"$ref": "#/$defs/meta"},
        },
        "required": ["category", "priority", "confidence", "similar", "summary", "meta"],
        "additionalProperties": False,
        "$defs": {"meta": {"type": "object", "properties": {"escalate": {"type": "boolean"}}, "required": ["escalate"]}},
    },
}


def test_forced_tool_use_obeys_schema(emu: Emulators) -> None:
    msg = client(emu).messages.create(model=SONNET, max_tokens=500, tools=[TRIAGE_TOOL],  # type: ignore[list-item]
                                      tool_choice={"type": "tool", "name": "record_triage"},
                                      messages=[{"role": "user", "content": "Payslip shows wrong overtime."}])
    assert msg.stop_reason == "tool_use"
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "record_triage" and block.id.startswith("toolu_")
    data = block.input
    assert isinstance(data, dict)
    props = TRIAGE_TOOL["input_schema"]["properties"]  # type: ignore[index]
    assert set(TRIAGE_TOOL["input_schema"]["required"]) <= set(data) <= set(props)  # type: ignore[index]
    assert data["category"] in props["category"]["enum"] and data["priority"] in props["priority"]["enum"]
    assert 0 <= data["confidence"] <= 1 and 2 <= data["retries"] <= 7 and isinstance(data["retries"], int)
    assert len(data["similar"]) >= 1 and all(__import__("re").fullmatch(r"[A-Z]+-[0-9]+", s) for s in data["similar"])
    assert 20 <= len(data["summary"]) <= 200 and isinstance(data["meta"]["escalate"], bool)
    assert msg.usage.input_tokens >= emu.anthropic_info()["tool_use_system_prompt_tokens"]["tool"]


def test_tool_choice_any_picks_a_tool_and_auto_answers_text(emu: Emulators) -> None:
    c = client(emu)
    ask = [{"role": "user", "content": "x"}]
    anyc = c.messages.create(model=SONNET, max_tokens=500, tools=[TRIAGE_TOOL], tool_choice={"type": "any"}, messages=ask)  # type: ignore[list-item]
    assert anyc.content[0].type == "tool_use"
    auto = c.messages.create(model=SONNET, max_tokens=500, tools=[TRIAGE_TOOL], messages=ask)  # type: ignore[list-item]
    assert auto.content[0].type == "text" and auto.stop_reason == "end_turn"


# ------------------------------------------------------------------ scripts and faults

def test_scripted_replies_with_match(emu: Emulators) -> None:
    emu.script_anthropic([{"match": "TICKET-42", "text": "Scripted for 42", "output_tokens": 7},
                          {"tool_input": {"category": "leave"}, "tool_name": "record_triage"}])
    c = client(emu)
    other = c.messages.create(model=SONNET, max_tokens=500, tools=[TRIAGE_TOOL], messages=[{"role": "user", "content": "x"}])  # type: ignore[list-item]
    assert other.content[0].type == "tool_use" and other.content[0].input == {"category": "leave"}
    matched = c.messages.create(model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "About TICKET-42"}])
    assert matched.content[0].text == "Scripted for 42" and matched.usage.output_tokens == 7  # type: ignore[union-attr]
    after = c.messages.create(model=SONNET, max_tokens=50, messages=[{"role": "user", "content": "About TICKET-42"}])
    assert after.content[0].text != "Scripted for 42"  # type: ignore[union-attr]


def test_sdk_retries_429_honouring_retry_after_then_succeeds(emu: Emulators) -> None:
    emu.script_anthropic([{"status": 429, "retry_after": "0.05", "times": 2}, {"text": "finally"}])
    msg = client(emu, max_retries=2).messages.create(model=SONNET, max_tokens=20, messages=[{"role": "user", "content": "x"}])
    assert msg.content[0].text == "finally"  # type: ignore[union-attr]
    statuses = [r["status"] for r in emu.anthropic_requests("/v1/messages")]
    assert statuses == [429, 429, 200]


def test_529_overloaded_surfaces_without_retries_and_recovers_with_them(emu: Emulators) -> None:
    emu.script_anthropic([{"status": 529, "retry_after": "0.01"}])
    with pytest.raises(anthropic.InternalServerError) as exc:
        client(emu).messages.create(model=SONNET, max_tokens=20, messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 529 and exc.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    emu.script_anthropic([{"status": 529, "retry_after": "0.01"}, {"status": 500, "retry_after": "0.01"}])
    ok = client(emu, max_retries=2).messages.create(model=SONNET, max_tokens=20, messages=[{"role": "user", "content": "x"}])
    assert ok.stop_reason == "end_turn"


def test_scripted_400_is_not_retried(emu: Emulators) -> None:
    emu.script_anthropic([{"status": 400, "message": "scripted denial"}, {"text": "never"}])
    with pytest.raises(anthropic.BadRequestError, match="scripted denial"):
        client(emu, max_retries=2).messages.create(model=SONNET, max_tokens=20, messages=[{"role": "user", "content": "x"}])
    assert len(emu.anthropic_requests("/v1/messages")) == 1


def test_slow_reply_times_out_the_client(emu: Emulators) -> None:
    emu.script_anthropic([{"delay_seconds": 0.5, "text": "late"}])
    with pytest.raises(anthropic.APITimeoutError):
        client(emu, timeout=0.1).messages.create(model=SONNET, max_tokens=20, messages=[{"role": "user", "content": "late"}])
    # The emulator still finishes the abandoned request (and records it) after its delay; wait for that, so it
    # cannot land in the next test's recording.
    deadline = time.monotonic() + 10
    while not emu.anthropic_requests("/v1/messages") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["body"]["messages"][0]["content"] for r in emu.anthropic_requests("/v1/messages")] == ["late"]


def test_streaming_reports_the_same_usage(emu: Emulators) -> None:
    c = client(emu)
    system = cached_system(1500)
    with c.messages.stream(model=SONNET, max_tokens=100, system=system,  # type: ignore[arg-type]
                           messages=[{"role": "user", "content": "x"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens > 0  # type: ignore[union-attr]
    assert final.usage.cache_creation_input_tokens > 0
    plain = c.messages.create(model=SONNET, max_tokens=100, system=system, messages=[{"role": "user", "content": "x"}])  # type: ignore[arg-type]
    assert plain.usage.cache_read_input_tokens == final.usage.cache_creation_input_tokens


def test_recorded_requests_redact_the_key(emu: Emulators) -> None:
    # SDK 2.x sends the API key as `Authorization: Bearer`; raw callers send `x-api-key`: both are accepted.
    client(emu).messages.create(model=SONNET, max_tokens=20, messages=[{"role": "user", "content": "record me"}])
    recs = emu.anthropic_requests()
    assert len(recs) == 1, recs
    assert {k.lower(): v for k, v in recs[0]["headers"].items()}["authorization"] == "[redacted]" and emu.anthropic_key not in json.dumps(recs)
    assert recs[0]["body"]["messages"][0]["content"] == "record me" and recs[0]["response"]["usage"]["output_tokens"] > 0


def test_reset_clears_cache_script_and_clock(emu: Emulators) -> None:
    c = client(emu)
    system = cached_system(1500)
    c.messages.create(model=SONNET, max_tokens=20, system=system, messages=[{"role": "user", "content": "x"}])  # type: ignore[arg-type]
    emu.script_anthropic([{"text": "pending"}])
    emu.advance_anthropic_clock(10)
    emu.reset()
    u = c.messages.create(model=SONNET, max_tokens=20, system=system, messages=[{"role": "user", "content": "x"}])  # type: ignore[arg-type]
    assert u.usage.cache_read_input_tokens == 0 and u.content[0].text != "pending"  # type: ignore[union-attr]
    assert requests.get(emu.anthropic_url + "/_emulator/anthropic/clock", timeout=5).json()["offset_seconds"] == 0
