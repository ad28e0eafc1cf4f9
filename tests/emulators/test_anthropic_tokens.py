"""Properties of the emulator's token counter that guardrails relies on (bytes are an upper bound)."""
from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from emulators import anthropic_tokens as tok
from emulators.anthropic_api import validate
from emulators.anthropic_schema import generate

text = st.text(min_size=1, max_size=200)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=False, allow_infinity=False), text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                          max_leaves=12)
block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.builds(lambda t, i: {"type": "tool_use", "id": "toolu_1", "name": "n", "input": i}, text, st.dictionaries(st.text(max_size=8), json_value, max_size=3)),
    st.builds(lambda t: {"type": "tool_result", "tool_use_id": "toolu_1", "content": t}, text),
)
def _message(role: str, content: Any) -> dict[str, Any]:
    if role == "assistant" and isinstance(content, list):  # tool results belong to user turns
        content = [b for b in content if b["type"] != "tool_result"] or [{"type": "text", "text": "ok"}]
    return {"role": role, "content": content}


message = st.builds(_message, st.sampled_from(["user", "assistant"]), st.one_of(text, st.lists(block, min_size=1, max_size=3)))
tool = st.builds(lambda name, desc, props: {"name": name, "description": desc,
                                            "input_schema": {"type": "object", "properties": props}},
                 st.from_regex(r"[a-z_]{1,12}", fullmatch=True), text,
                 st.dictionaries(st.text(min_size=1, max_size=8), st.fixed_dictionaries({"type": st.sampled_from(["string", "integer"])}), max_size=3))
request = st.builds(
    lambda msgs, system, tools, choice, ascii_only: (
        {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": msgs,
         **({"system": system} if system else {}),
         **({"tools": tools, "tool_choice": {"type": choice}} if tools else {})}, ascii_only),
    st.lists(message, min_size=1, max_size=4), st.one_of(st.none(), text), st.lists(tool, max_size=3, unique_by=lambda t: t["name"]),
    st.sampled_from(["auto", "any", "none"]), st.booleans())


@settings(max_examples=120, deadline=None)
@given(request)
def test_input_tokens_never_exceed_body_bytes_plus_tool_prompt(case: tuple[dict[str, Any], bool]) -> None:
    body, ascii_only = case
    validate(body, needs_max_tokens=True)
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=ascii_only).encode()
    assert tok.count_input_tokens(body) <= tok.max_input_tokens_bound(raw, body)


@settings(max_examples=200, deadline=None)
@given(text)
def test_text_tokens_at_most_utf8_bytes(s: str) -> None:
    assert 0 < tok.text_tokens(s) <= len(s.encode())


def test_generated_values_respect_nested_bounds() -> None:
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 12},
        "xs": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 3, "uniqueItems": True},
        "when": {"type": "string", "format": "date-time"},
        "opt": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 5}]},
        "pct": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 5},
    }, "required": ["n"]}
    out = generate(schema)
    assert out["n"] == 11 and sorted(out["xs"]) == ["a", "b", "c"] and out["when"].endswith("Z")
    assert out["opt"] >= 5 and 0 <= out["pct"] <= 100 and out["pct"] % 5 == 0
