"""LLM mode through the real `anthropic` SDK against the Anthropic emulator: cached prefix, ticket last,
structured output validated, malformed output retried once then escalated."""
from __future__ import annotations

from typing import Any

from services.triage import service
from services.triage.config import TriageConfig

from .conftest import neighbour, sdk_caller, ticket

GOOD = {"category": "timesheets", "priority": "Major", "component": "time-clock",
        "suggested_resolution": "Same as PAY-530: fix the location time zone, then re-process punches.",
        "references": ["PAY-530"], "confidence": 0.82, "needs_human": False, "reasons": [],
        "forbidden_request": False}

SIMILAR = [neighbour("PAY-530", 0.9, category="timesheets", priority="Major", component="time-clock"),
           neighbour("PAY-531", 0.8, category="timesheets", priority="Major", component="time-clock")]


def _triage(emu: Any, make_deps: Any, cfg: TriageConfig, similar: list[dict[str, Any]] | None = None,
            **t: Any) -> service.TriageOutcome:
    deps = make_deps(similar=SIMILAR if similar is None else similar,
                     llm=sdk_caller(emu.anthropic_url, emu.anthropic_key))
    return service.triage(ticket=service.normalize_ticket(ticket(**t), cfg), run_id="run-1", deps=deps)


def test_llm_answer_becomes_the_proposal_and_the_prefix_is_read_from_cache(emu, make_deps, cfg, prices) -> None:
    emu.script_anthropic([{"tool_input": GOOD, "times": 2}])
    first = _triage(emu, make_deps, cfg, key="PAY-2001")
    second = _triage(emu, make_deps, cfg, key="PAY-2002", summary="Mobile clocking records the wrong hour")
    assert first.mode == "llm" and first.model == "claude-haiku-4-5" and first.llm_attempts == 1
    assert (first.result.category.value, first.result.priority.value) == ("timesheets", "Major")
    assert not first.reasons and [p.target for p in first.proposals] == ["PAY-2001", "PAY-2001"]
    assert first.usage.cache_creation_input_tokens > 4096 and first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.input_tokens < second.usage.cache_read_input_tokens / 4
    assert second.usage.cost_usd < first.usage.cost_usd / 2
    body = emu.anthropic_requests("/v1/messages")[-1]["body"]
    assert body["model"] == "claude-haiku-4-5"
    assert body["tool_choice"] == {"type": "tool", "name": "record_triage"}
    assert body["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    user = body["messages"][0]["content"]
    assert user.rstrip().endswith("</ticket>") and "Mobile clocking records the wrong hour" in user
    assert user.index("<similar_tickets>") < user.index("<ticket>")


def test_malformed_output_is_retried_once_with_the_error(emu, make_deps, cfg) -> None:
    bad = dict(GOOD, category="payroll-magic")
    emu.script_anthropic([{"tool_input": bad}, {"tool_input": GOOD}])
    out = _triage(emu, make_deps, cfg)
    assert out.mode == "llm" and out.llm_attempts == 2 and not out.reasons
    retry = emu.anthropic_requests("/v1/messages")[-1]["body"]["messages"]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    result = retry[2]["content"][0]
    assert result["type"] == "tool_result" and result["is_error"] is True and "category" in result["content"]
    assert out.usage.calls == 2


def test_malformed_twice_escalates_and_proposes_nothing(emu, make_deps, cfg) -> None:
    emu.script_anthropic([{"tool_input": {"category": "timesheets"}}, {"text": "I think it's timesheets."}])
    out = _triage(emu, make_deps, cfg)
    assert out.mode == "llm" and out.llm_attempts == 2
    assert [r.code for r in out.reasons][0] == "llm_output_invalid"
    assert out.proposals == [] and out.escalation is not None
    assert out.usage.calls == 2 and out.usage.cost_usd > 0


def test_model_asking_for_a_human_escalates(emu, make_deps, cfg) -> None:
    emu.script_anthropic([{"tool_input": dict(GOOD, needs_human=True, reasons=["payroll is due today"])}])
    out = _triage(emu, make_deps, cfg)
    assert [r.code for r in out.reasons] == ["model_needs_human"]
    assert "payroll is due today" in out.escalation["reason"]  # type: ignore[index]


def test_model_contradicting_confident_evidence_is_a_conflict(emu, make_deps, cfg) -> None:
    emu.script_anthropic([{"tool_input": dict(GOOD, category="billing", component="billing-portal",
                                              references=[])}])
    strong = [neighbour(f"PAY-{i}", 0.95, category="timesheets", priority="Major") for i in range(1, 6)]
    out = _triage(emu, make_deps, cfg, similar=strong)
    assert "conflicting_evidence:category" in [r.code for r in out.reasons]
    assert out.proposals == []


def test_generated_tool_output_from_the_schema_is_always_valid(emu, make_deps, cfg) -> None:
    # No script: the emulator invents an answer from the tool's JSON schema, so the schema alone must
    # be enough to produce a valid answer (enums, bounds, required fields).
    out = _triage(emu, make_deps, cfg)
    assert out.mode == "llm" and out.llm_attempts == 1
    assert out.result.category.value in {c.id for c in make_deps().taxonomy.categories}
