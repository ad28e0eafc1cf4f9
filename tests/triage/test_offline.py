"""The offline classifier: a weighted vote of resolved neighbours with an honest confidence."""
from __future__ import annotations

from typing import Callable

from services.triage import service
from services.triage.config import Taxonomy, TriageConfig

from .conftest import neighbour, ticket


def _run(make_deps: Callable[..., service.TriageDeps], cfg: TriageConfig, similar: list[dict], **t: str) -> service.TriageOutcome:
    deps = make_deps(similar=similar)
    return service.triage(ticket=service.normalize_ticket(ticket(**t), cfg), run_id="r1", deps=deps)


def test_close_agreeing_neighbours_give_a_confident_answer_and_a_proposal(make_deps, cfg) -> None:
    similar = [neighbour("PAY-530", 0.92, category="timesheets", priority="Major", component="time-clock",
                         resolution="Location time zone was Sydney instead of Brisbane; corrected it."),
               neighbour("PAY-531", 0.85, category="timesheets", priority="Major", component="time-clock"),
               neighbour("PAY-700", 0.40, category="rostering", priority="Minor", component="scheduler")]
    out = _run(make_deps, cfg, similar)
    assert out.mode == "offline" and out.fallback_reason == "LLM mode not configured"
    assert (out.result.category.value, out.result.priority.value, out.result.component.value) == \
        ("timesheets", "Major", "time-clock")
    assert out.result.confidence > 0.7
    assert out.result.references[0] == "PAY-530"
    assert "Brisbane" in out.result.suggested_resolution
    assert not out.reasons and [p.operation for p in out.proposals] == ["add_comment", "add_labels"]


def test_one_weak_neighbour_is_not_certainty(make_deps, cfg) -> None:
    out = _run(make_deps, cfg, [neighbour("PAY-1", 0.3, category="leave", priority="Major", component="leave-engine")],
               summary="Something odd on the screen")
    # Unanimous but thin: smoothing keeps the confidence low, and triage escalates instead of proposing.
    assert out.result.category.value == "leave"
    assert out.result.confidence < cfg.min_confidence
    assert [r.code for r in out.reasons] == ["low_confidence"]
    assert out.proposals == [] and out.escalation is not None


def test_split_evidence_is_reported_as_conflict(make_deps, cfg) -> None:
    similar = [neighbour("PAY-1", 0.9, category="payroll-calculation", priority="Critical"),
               neighbour("PAY-2", 0.88, category="award-interpretation", priority="Critical"),
               neighbour("PAY-3", 0.86, category="payroll-calculation", priority="Critical"),
               neighbour("PAY-4", 0.85, category="award-interpretation", priority="Critical")]
    out = _run(make_deps, cfg, similar, summary="Weekend pay is wrong")
    codes = [r.code for r in out.reasons]
    assert "conflicting_evidence:category" in codes
    assert out.proposals == []


def test_no_evidence_escalates_with_a_clear_reason(make_deps, cfg) -> None:
    out = _run(make_deps, cfg, [], summary="It does not work")
    assert out.result.category.value is None
    assert {"no_evidence", "low_confidence"} <= {r.code for r in out.reasons}
    assert out.escalation is not None and out.escalation["subject"] == "PAY-2001"
    assert out.proposals == []


def test_keywords_give_cold_start_evidence_but_not_confidence(make_deps, cfg, taxonomy: Taxonomy) -> None:
    out = _run(make_deps, cfg, [neighbour("PAY-9", 0.8, priority="Major")],
               summary="Annual leave balance wrong after accrual run")
    assert out.result.category.value == "leave"
    assert out.result.category.confidence < 0.5


def test_ties_break_deterministically_by_taxonomy_order(cfg, taxonomy: Taxonomy) -> None:
    v = service.vote([("Minor", 0.5, "a"), ("Major", 0.5, "b")], taxonomy.ids("priority"), cfg)
    assert v.value == "Major" and v.conflict


def test_neighbour_values_outside_the_taxonomy_are_ignored(make_deps, cfg) -> None:
    similar = [{"key": "X-1", "score": 0.9, "priority": "P0-SUPER", "components": ["nuclear-reactor"],
                "labels": ["category-evil"], "resolution": "r", "summary": "s"}]
    out = _run(make_deps, cfg, similar)
    assert out.result.priority.value is None and out.result.component.value is None


def test_empty_description_is_triaged_from_the_summary(make_deps, cfg) -> None:
    similar = [neighbour("PAY-530", 0.9, category="timesheets", priority="Major", component="time-clock"),
               neighbour("PAY-531", 0.9, category="timesheets", priority="Major", component="time-clock")]
    out = _run(make_deps, cfg, similar, description="")
    assert out.result.category.value == "timesheets"
    assert "empty description: triaged from the summary" in out.notes


def test_huge_descriptions_are_truncated_to_the_stated_limit(make_deps, cfg) -> None:
    seen: list[service.Ticket] = []
    deps = make_deps(similar=[])
    deps.similar = lambda t: seen.append(t) or []  # type: ignore[func-returns-value]
    body = "Timesheet rounding wrong. " * 2000
    out = service.triage(ticket=service.normalize_ticket(ticket(description=body), cfg), run_id="r", deps=deps)
    assert len(seen[0].description) == cfg.description_chars == 6000
    assert out.ticket.description_truncated_from == len(body.strip())
    assert f"description truncated from {len(body.strip())} to 6000 characters" in out.notes


def test_adf_description_is_flattened(cfg) -> None:
    adf = {"type": "doc", "version": 1, "content": [{"type": "paragraph", "content": [
        {"type": "text", "text": "Kiosk"}, {"type": "hardBreak"}, {"type": "text", "text": "late"}]}]}
    t = service.normalize_ticket({"key": "PAY-1", "summary": "s", "description": adf}, cfg)
    assert t.description == "Kiosk\nlate"


def test_unreachable_dedupe_still_answers_with_a_note(make_deps, cfg) -> None:
    deps = make_deps()

    def down(_: service.Ticket) -> list:
        raise service.RetrievalError("dedupe /v1/similar: ConnectionError")

    deps.similar = down
    out = service.triage(ticket=service.normalize_ticket(ticket(), cfg), run_id="r", deps=deps)
    assert any("similar-ticket search unavailable" in n for n in out.notes)
    assert out.needs_human
