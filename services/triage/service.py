"""Triage logic: normalise the ticket, gather evidence, classify (LLM or offline vote), decide whether a
human must look, and build the proposals or the escalation — by code only, never by the model."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from shared.connectors.adf import adf_to_text
from shared.jira_webhooks import JIRA_KEY, WebhookRejected, issue_external_id, parse_jira_webhook

from .config import Taxonomy, TriageConfig
from .prompt import LlmAnswer, MalformedOutput, build_request, build_user_message, parse_answer, retry_messages

log = logging.getLogger(__name__)

_URL = re.compile(r"(?i)\b(?:https?|ftp|file|javascript|data):[^\s<>()\]\"']+")
_MENTION = re.compile(r"\[~[^\]]{1,100}\]|@(?:channel|here|everyone|all)\b", re.I)


# --------------------------------------------------------------------------- tickets

@dataclass(frozen=True)
class Ticket:
    """The triggering ticket, normalised and truncated to the stated limits."""

    key: str
    summary: str
    description: str
    issue_type: str | None = None
    project: str | None = None
    priority: str | None = None
    components: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    created: str | None = None
    # Original lengths when a field was cut (None when it was not).
    description_truncated_from: int | None = None
    summary_truncated_from: int | None = None
    description_chars_limit: int = 0

    @property
    def text(self) -> str:
        """Summary and description as one string (for screening and keyword evidence)."""
        return f"{self.summary}\n{self.description}"

    def for_prompt(self) -> dict[str, Any]:
        """The fields the model sees."""
        return {"key": self.key, "issue_type": self.issue_type, "project": self.project, "priority": self.priority,
                "components": list(self.components), "summary": self.summary, "description": self.description,
                "truncated": self.description_chars_limit if self.description_truncated_from else None}

    def for_dedupe(self) -> dict[str, Any]:
        """The ticket as dedupe's search endpoints take it."""
        out: dict[str, Any] = {"key": self.key, "summary": self.summary or "(no summary)",
                               "description": self.description}
        if self.project:
            out["project"] = self.project
        if self.created:
            out["created"] = self.created
        return out


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _clean(text: str) -> str:
    # Control characters are never meaningful in a ticket and can confuse downstream renderers.
    return _CONTROL.sub(" ", text).replace("\r\n", "\n").strip()


def normalize_ticket(data: Mapping[str, Any], cfg: TriageConfig) -> Ticket:
    """Build a Ticket from API input (description as text or ADF), truncating to the configured limits."""
    summary = _clean(adf_to_text(data.get("summary")) if not isinstance(data.get("summary"), str)
                     else data["summary"])
    description = _clean(adf_to_text(data.get("description")))
    s_from = len(summary) if len(summary) > cfg.summary_chars else None
    d_from = len(description) if len(description) > cfg.description_chars else None
    return Ticket(
        key=str(data["key"]),
        summary=summary[: cfg.summary_chars],
        description=description[: cfg.description_chars],
        issue_type=data.get("issue_type") or None,
        project=data.get("project") or (str(data["key"]).split("-")[0] if "-" in str(data["key"]) else None),
        priority=data.get("priority") or None,
        components=tuple(data.get("components") or ()),
        labels=tuple(data.get("labels") or ()),
        created=data.get("created") or None,
        description_truncated_from=d_from,
        summary_truncated_from=s_from,
        description_chars_limit=cfg.description_chars,
    )


def ticket_from_jira_issue(issue: Mapping[str, Any]) -> dict[str, Any]:
    """A Jira issue (webhook `issue` or REST v3 issue) as triage's ticket input."""
    f = issue.get("fields") or {}

    def name(obj: Any) -> str | None:
        return obj.get("name") if isinstance(obj, dict) else None

    return {
        "key": issue.get("key"),
        "summary": f.get("summary") or "",
        "description": adf_to_text(f.get("description")),
        "issue_type": name(f.get("issuetype")),
        "project": (f.get("project") or {}).get("key"),
        "priority": name(f.get("priority")),
        "components": [c.get("name") for c in f.get("components") or [] if isinstance(c, dict) and c.get("name")],
        "labels": [lb for lb in f.get("labels") or [] if isinstance(lb, str)],
        "created": f.get("created"),
    }


# --------------------------------------------------------------------------- evidence

class RetrievalError(Exception):
    """Dedupe could not be asked (down, timeout, bad answer): triage goes on with less evidence."""


@dataclass(frozen=True)
class Evidence:
    """A resolved similar ticket (or KB article) from dedupe."""

    key: str
    score: float
    summary: str = ""
    resolution: str = ""
    status: str | None = None
    priority: str | None = None
    components: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    url: str | None = None
    kind: str = "ticket"
    category: str | None = None


def evidence_from_similar(items: Sequence[Mapping[str, Any]], taxonomy: Taxonomy) -> list[Evidence]:
    """Normalise dedupe's `/v1/similar` results; the category comes from the ticket's taxonomy labels."""
    out: list[Evidence] = []
    for it in items:
        key = it.get("key")
        if not isinstance(key, str) or not key:
            continue
        labels = tuple(x for x in it.get("labels") or [] if isinstance(x, str))
        cats = taxonomy.category_from_labels(list(labels))
        if not cats and it.get("category") in taxonomy.ids("category"):
            cats = [it["category"]]
        comps = it.get("components") or []
        try:
            score = float(it.get("score") or 0.0)
        except (TypeError, ValueError):
            score = 0.0
        out.append(Evidence(
            key=key, score=score, summary=str(it.get("summary") or ""),
            resolution=str(it.get("resolution_text") or it.get("resolution") or ""),
            status=it.get("status"), priority=it.get("priority"),
            components=tuple(c for c in comps if isinstance(c, str)), labels=labels,
            url=it.get("url") if isinstance(it.get("url"), str) else None,
            kind=str(it.get("kind") or "ticket"), category=cats[0] if cats else None))
    return out


# --------------------------------------------------------------------------- offline vote

@dataclass(frozen=True)
class FieldVote:
    """A weighted vote for one field: the winner, an honest confidence and whether evidence conflicts."""

    value: str | None
    confidence: float
    weights: dict[str, float]
    conflict: bool = False
    support: tuple[str, ...] = ()


def vote(ballots: Sequence[tuple[str, float, str]], allowed: Sequence[str], cfg: TriageConfig) -> FieldVote:
    """Tally (value, weight, source) ballots; confidence = winner / (total + prior), so thin evidence stays modest."""
    allowed_set = set(allowed)
    weights: dict[str, float] = {}
    sources: dict[str, list[str]] = {}
    for value, weight, source in ballots:
        if value not in allowed_set or weight <= 0:
            continue
        weights[value] = weights.get(value, 0.0) + weight
        sources.setdefault(value, []).append(source)
    if not weights:
        return FieldVote(None, 0.0, {})
    # Ties break by taxonomy order, so the same evidence always gives the same answer.
    order = {v: i for i, v in enumerate(allowed)}
    ranked = sorted(weights.items(), key=lambda kv: (-kv[1], order[kv[0]]))
    winner, top = ranked[0]
    total = sum(weights.values())
    confidence = top / (total + cfg.prior_weight)
    conflict = len(ranked) > 1 and ranked[1][1] >= cfg.conflict_ratio * top and ranked[1][1] >= cfg.conflict_min_weight
    return FieldVote(winner, round(confidence, 4), {k: round(v, 4) for k, v in ranked}, conflict,
                     tuple(dict.fromkeys(sources[winner])))


def neighbour_weight(score: float, cfg: TriageConfig) -> float:
    """How much one neighbour's vote counts."""
    return float(max(score, 0.0) ** cfg.score_power)


def _match(value: str | None, allowed: Sequence[str]) -> str | None:
    if not value:
        return None
    lowered = {a.lower(): a for a in allowed}
    return lowered.get(value.strip().lower())


def keyword_hits(text: str, taxonomy: Taxonomy) -> dict[str, int]:
    """Category -> number of distinct taxonomy keywords found in the text (cold-start evidence)."""
    low = " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "
    hits: dict[str, int] = {}
    for cat in taxonomy.categories:
        n = sum(1 for kw in cat.keywords if f" {' '.join(re.findall(r'[a-z0-9]+', kw))} " in low)
        if n:
            hits[cat.id] = n
    return hits


@dataclass(frozen=True)
class Classification:
    """Category, priority and component with confidences, the suggestion and its references."""

    category: FieldVote
    priority: FieldVote
    component: FieldVote
    suggested_resolution: str
    references: tuple[str, ...]
    confidence: float


def classify_offline(ticket: Ticket, evidence: Sequence[Evidence], taxonomy: Taxonomy,
                     cfg: TriageConfig) -> Classification:
    """The weighted vote of the nearest resolved tickets, plus weak keyword evidence for the category."""
    cat_ballots: list[tuple[str, float, str]] = []
    pri_ballots: list[tuple[str, float, str]] = []
    comp_ballots: list[tuple[str, float, str]] = []
    cats, pris, comps = taxonomy.ids("category"), taxonomy.ids("priority"), taxonomy.ids("component")
    for ev in evidence:
        w = neighbour_weight(ev.score, cfg)
        if ev.category:
            cat_ballots.append((ev.category, w, ev.key))
        pri = _match(ev.priority, pris)
        if pri:
            pri_ballots.append((pri, w, ev.key))
        matched = [c for c in (_match(x, comps) for x in ev.components) if c]
        for c in matched:
            comp_ballots.append((c, w / len(matched), ev.key))
    hits = keyword_hits(ticket.text, taxonomy)
    if hits:
        most = max(hits.values())
        for cat, n in hits.items():
            cat_ballots.append((cat, cfg.keyword_weight * n / most, "keywords"))
    for c in ticket.components:
        m = _match(c, comps)
        if m:
            comp_ballots.append((m, cfg.keyword_weight, "reporter"))
    category = vote(cat_ballots, cats, cfg)
    priority = vote(pri_ballots, pris, cfg)
    component = vote(comp_ballots, comps, cfg)
    suggestion, refs = offline_suggestion(evidence, category.value, cfg)
    return Classification(category, priority, component, suggestion, refs,
                          round(min(category.confidence, priority.confidence), 4))


def offline_suggestion(evidence: Sequence[Evidence], category: str | None,
                       cfg: TriageConfig, limit: int = 3) -> tuple[str, tuple[str, ...]]:
    """The neighbours' resolutions as the suggestion (same-category neighbours first), with their keys."""
    useful = [e for e in evidence if e.resolution.strip()]
    useful.sort(key=lambda e: (e.category != category if category else False, -e.score))
    chosen = useful[:limit]
    if not chosen:
        return ("No similar resolved ticket was found. Check which screen or process is affected, what the "
                "reporter expected and what happened instead, and ask for one example employee or pay run."), ()
    lines = ["Similar resolved tickets and how they were resolved:"]
    for e in chosen:
        res = " ".join(e.resolution.split())[: cfg.evidence_resolution_chars]
        summ = " ".join(e.summary.split())[: cfg.evidence_summary_chars]
        lines.append(f"- {e.key} (similarity {e.score:.2f}) — {summ}: {res}")
    return "\n".join(lines), tuple(e.key for e in chosen)


# --------------------------------------------------------------------------- safety screening

@dataclass(frozen=True)
class Reason:
    """Why a human must look: a stable code and a sentence."""

    code: str
    detail: str


def screen_forbidden(ticket: Ticket, cfg: TriageConfig) -> list[Reason]:
    """Requests no automation should act on, found by the configured patterns (independent of any model)."""
    text = ticket.text
    found: list[Reason] = []
    for rule in cfg.forbidden:
        m = rule.pattern.search(text)
        if m:
            snippet = " ".join(m.group(0).split())[:80]
            found.append(Reason(f"forbidden_request:{rule.id}", f"{rule.reason} (matched: \"{snippet}\")"))
    return found


def sanitize_model_text(text: str, allowed_urls: Sequence[str], limit: int) -> str:
    """Model text becomes comment text: links not taken from the evidence and mentions are removed, length capped."""
    allowed = set(allowed_urls)

    def _url(m: re.Match[str]) -> str:
        return m.group(0) if m.group(0) in allowed else "[link removed]"

    text = _URL.sub(_url, text)
    text = _MENTION.sub("[mention removed]", text)
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- LLM mode

class BudgetDenied(Exception):
    """Guardrails refused the LLM call (budget, kill switch or model policy): use the offline mode."""


class LlmUnavailable(Exception):
    """The gateway or upstream failed after the SDK's own retries: use the offline mode."""


@dataclass
class Usage:
    """Token counts and cost of the LLM calls of one triage."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, usage: Any, cost: float) -> None:
        """Add one response's `usage` and its cost."""
        self.calls += 1
        self.input_tokens += int(getattr(usage, "input_tokens", 0) or 0)
        self.output_tokens += int(getattr(usage, "output_tokens", 0) or 0)
        self.cache_creation_input_tokens += int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
        self.cache_read_input_tokens += int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        self.cost_usd = round(self.cost_usd + cost, 8)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {"llm_calls": self.calls, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cache_creation_input_tokens": self.cache_creation_input_tokens,
                "cache_read_input_tokens": self.cache_read_input_tokens, "usd": round(self.cost_usd, 6)}


def price_usage(usage: Any, model: str, prices: Mapping[str, Mapping[str, float]]) -> float:
    """USD of one response from its `usage`, priced per token kind from config/prices.yaml."""
    base = re.sub(r"-\d{8}$", "", model)  # dated ids are priced as their undated name
    p = prices.get(model) or prices.get(base)
    if p is None:
        raise KeyError(f"no price for model {model!r} in prices.yaml")
    uncached = int(getattr(usage, "input_tokens", 0) or 0)
    out = int(getattr(usage, "output_tokens", 0) or 0)
    read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
    write_total = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
    detail = getattr(usage, "cache_creation", None)
    w1h = int(getattr(detail, "ephemeral_1h_input_tokens", 0) or 0) if detail is not None else 0
    w5m = write_total - w1h
    usd = (uncached * p["input"] + out * p["output"] + read * p["cache_read"]
           + w5m * p["cache_write_5m"] + w1h * p["cache_write_1h"]) / 1_000_000
    return usd


@dataclass
class LlmOutcome:
    """What the LLM mode produced: a validated answer, or why not."""

    answer: LlmAnswer | None
    usage: Usage
    attempts: int
    error: str | None = None
    latency_ms: float = 0.0


MessagesCreate = Callable[..., tuple[Any, float | None]]
"""Calls the Messages API with keyword arguments; returns (message, cost in USD reported by the gateway or None)."""


def classify_with_llm(*, create: MessagesCreate, model: str, prefix: str, tool: dict[str, Any],
                      ticket: Ticket, evidence: Sequence[Evidence], duplicates: Sequence[Mapping[str, Any]],
                      taxonomy: Taxonomy, cfg: TriageConfig,
                      prices: Mapping[str, Mapping[str, float]]) -> LlmOutcome:
    """Ask the model through the gateway; malformed output is retried once, then reported (never guessed).

    Raises BudgetDenied / LlmUnavailable for the caller to fall back to the offline mode."""
    similar = [{"key": e.key, "score": e.score, "summary": e.summary, "resolution": e.resolution,
                "category": e.category, "priority": e.priority,
                "component": e.components[0] if e.components else None, "url": e.url} for e in evidence]
    user = build_user_message(ticket.for_prompt(), similar, [dict(d) for d in duplicates], cfg)
    request = build_request(model=model, prefix=prefix, tool=tool, user_message=user, cfg=cfg)
    usage = Usage()
    started = time.monotonic()
    error: MalformedOutput | None = None
    for attempt in range(1, cfg.llm_max_attempts + 1):
        message, gateway_cost = create(**request)
        cost = gateway_cost if gateway_cost is not None else price_usage(message.usage, model, prices)
        usage.add(message.usage, cost)
        try:
            answer = parse_answer(message.content, taxonomy, cfg)
            return LlmOutcome(answer, usage, attempt, latency_ms=(time.monotonic() - started) * 1000)
        except MalformedOutput as exc:
            error = exc
            log.warning("triage LLM output malformed (attempt %d): %s", attempt, exc)
            request = dict(request, messages=retry_messages(user, message.content, exc))
    return LlmOutcome(None, usage, cfg.llm_max_attempts, f"malformed model output: {error}",
                      latency_ms=(time.monotonic() - started) * 1000)


def classification_from_llm(answer: LlmAnswer, evidence: Sequence[Evidence],
                            duplicates: Sequence[Mapping[str, Any]], cfg: TriageConfig) -> Classification:
    """The model's answer as a Classification; references are kept only when they name real evidence."""
    known = {e.key for e in evidence} | {str(d.get("key")) for d in duplicates}
    refs = tuple(dict.fromkeys(r for r in answer.references if r in known))
    urls = [e.url for e in evidence if e.url]
    text = sanitize_model_text(answer.suggested_resolution, urls, cfg.resolution_chars)
    c = answer.confidence
    return Classification(
        FieldVote(answer.category, c, {answer.category: c}), FieldVote(answer.priority, c, {answer.priority: c}),
        FieldVote(answer.component, c, {answer.component: c}), text, refs, round(c, 4))


# --------------------------------------------------------------------------- decisions

def escalation_reasons(*, mode: str, result: Classification, offline: Classification,
                       forbidden: Sequence[Reason], answer: LlmAnswer | None, llm_error: str | None,
                       ticket: Ticket, cfg: TriageConfig) -> list[Reason]:
    """Every reason a human must look instead of a comment being proposed (empty: propose)."""
    reasons = list(forbidden)
    if llm_error:
        reasons.append(Reason("llm_output_invalid", llm_error[:300]))
    if answer is not None:
        if answer.forbidden_request and not forbidden:
            reasons.append(Reason("forbidden_request:model", "the model judged that the ticket asks for something "
                                                             "no automation should do"))
        if answer.needs_human:
            detail = "; ".join(answer.reasons)[:300] or "the model asked for a human"
            reasons.append(Reason("model_needs_human", detail))
    if not ticket.summary.strip() and not ticket.description.strip():
        reasons.append(Reason("empty_ticket", "the ticket has neither summary nor description"))
    if result.category.value is None:
        reasons.append(Reason("no_evidence", "no labelled similar ticket or keyword supports any category"))
    if result.confidence < cfg.min_confidence:
        reasons.append(Reason("low_confidence", f"confidence {result.confidence:.2f} is below the threshold "
                                                f"{cfg.min_confidence:.2f}"))
    if mode == "offline":
        for name, fv in (("category", result.category), ("priority", result.priority)):
            if fv.conflict:
                top = list(fv.weights.items())[:2]
                reasons.append(Reason(f"conflicting_evidence:{name}",
                                      f"similar tickets disagree on the {name}: "
                                      + " vs ".join(f"{k} ({v:.2f})" for k, v in top)))
    elif mode == "llm" and answer is not None:
        off = offline.category
        if off.value and off.value != answer.category and off.confidence >= cfg.offline_agreement_min_confidence:
            reasons.append(Reason("conflicting_evidence:category",
                                  f"the model says {answer.category} but similar tickets say {off.value} "
                                  f"(confidence {off.confidence:.2f})"))
    # One line per code keeps escalations readable.
    seen: set[str] = set()
    unique = []
    for r in reasons:
        if r.code not in seen:
            seen.add(r.code)
            unique.append(r)
    return unique


@dataclass(frozen=True)
class Proposal:
    """A write triage proposes to guardrails. Built by code only: fixed operations, the triggering ticket."""

    connector: str
    operation: str
    target: str
    payload: dict[str, Any]
    idempotency_key: str
    reason: str

    def as_dict(self, run_id: str) -> dict[str, Any]:
        """The body of `POST /v1/actions`."""
        return {"run_id": run_id, "connector": self.connector, "operation": self.operation, "target": self.target,
                "payload": self.payload, "idempotency_key": self.idempotency_key, "reason": self.reason}


def comment_text(*, ticket_key: str, mode: str, result: Classification, duplicates: Sequence[Mapping[str, Any]],
                 cfg: TriageConfig) -> str:
    """The internal comment: header, fields, the suggestion, references. Model text is inserted as text only."""
    lines = [cfg.comment_header, "",
             f"Category: {result.category.value} · Priority: {result.priority.value} · "
             f"Component: {result.component.value} · Confidence: {result.confidence:.0%} ({mode} mode)",
             "", "Suggested resolution:", result.suggested_resolution]
    if result.references:
        lines += ["", "References: " + ", ".join(result.references)]
    dups = [d for d in duplicates if d.get("key") and d.get("key") != ticket_key]
    if dups:
        lines += ["", "Possible duplicates: " + ", ".join(f"{d['key']} ({float(d.get('score') or 0):.2f})"
                                                         for d in dups[:5])]
    return "\n".join(lines)


def build_proposals(*, ticket_key: str, mode: str, result: Classification, duplicates: Sequence[Mapping[str, Any]],
                    taxonomy: Taxonomy, cfg: TriageConfig) -> list[Proposal]:
    """The normal proposal: an internal comment and taxonomy labels on the triggering ticket — nothing else."""
    if not JIRA_KEY.match(ticket_key):
        raise ValueError(f"not a Jira issue key: {ticket_key!r}")
    proposals: list[Proposal] = []
    why = f"triage ({mode}) of {ticket_key}"
    if "jira.add_comment" in cfg.operations:
        body = comment_text(ticket_key=ticket_key, mode=mode, result=result, duplicates=duplicates, cfg=cfg)
        proposals.append(Proposal("jira", "add_comment", ticket_key,
                                  {"body": body, "internal": cfg.internal_comment},
                                  f"triage:{ticket_key}:add_comment", why + ": suggested resolution"))
    if "jira.add_labels" in cfg.operations and result.category.value:
        labels = [taxonomy.category_label(result.category.value), *taxonomy.triage_labels]
        proposals.append(Proposal("jira", "add_labels", ticket_key, {"labels": list(dict.fromkeys(labels))},
                                  f"triage:{ticket_key}:add_labels", why + ": category label"))
    return proposals


def build_escalation(*, run_id: str, ticket: Ticket, mode: str, result: Classification,
                     reasons: Sequence[Reason]) -> dict[str, Any]:
    """The body of `POST /v1/escalations`: nothing is written to Jira when triage escalates."""
    return {
        "run_id": run_id,
        "reason": "; ".join(r.detail for r in reasons)[:1000],
        "subject": ticket.key,
        "context": {
            "task": "triage",
            "ticket_key": ticket.key,
            "summary": ticket.summary,
            "mode": mode,
            "reasons": [{"code": r.code, "detail": r.detail} for r in reasons],
            "suggestion": {"category": result.category.value, "priority": result.priority.value,
                           "component": result.component.value, "confidence": result.confidence,
                           "references": list(result.references)},
        },
    }


# --------------------------------------------------------------------------- orchestration

@dataclass
class TriageDeps:
    """Everything triage needs from outside, injected (HTTP clients in production, callables in tests)."""

    taxonomy: Taxonomy
    cfg: TriageConfig
    prefix: str
    tool: dict[str, Any]
    model: str
    prices: Mapping[str, Mapping[str, float]]
    similar: Callable[[Ticket], list[dict[str, Any]]]
    duplicates: Callable[[Ticket], dict[str, Any] | None]
    # run_id -> Messages API caller; None when the LLM mode is not configured.
    llm: Callable[[str], MessagesCreate] | None = None


@dataclass
class TriageOutcome:
    """Everything /v1/triage returns (before submission to guardrails)."""

    ticket: Ticket
    run_id: str
    mode: str
    model: str | None
    result: Classification
    offline: Classification
    evidence: list[Evidence]
    duplicates: dict[str, Any] | None
    reasons: list[Reason]
    proposals: list[Proposal]
    escalation: dict[str, Any] | None
    usage: Usage
    notes: list[str] = field(default_factory=list)
    fallback_reason: str | None = None
    llm_attempts: int = 0

    @property
    def needs_human(self) -> bool:
        """True when triage escalates instead of proposing."""
        return bool(self.reasons)


def triage(*, ticket: Ticket, run_id: str, deps: TriageDeps, mode: str = "auto") -> TriageOutcome:
    """Triage one ticket: evidence, classification, escalation rules, then proposals or an escalation."""
    cfg, taxonomy = deps.cfg, deps.taxonomy
    notes: list[str] = []
    if ticket.description_truncated_from:
        notes.append(f"description truncated from {ticket.description_truncated_from} to "
                     f"{cfg.description_chars} characters")
    if ticket.summary_truncated_from:
        notes.append(f"summary truncated from {ticket.summary_truncated_from} to {cfg.summary_chars} characters")
    if not ticket.description.strip():
        notes.append("empty description: triaged from the summary")
    try:
        evidence = evidence_from_similar(deps.similar(ticket), taxonomy)
    except RetrievalError as exc:
        evidence = []
        notes.append(f"similar-ticket search unavailable: {exc}")
    dup_result: dict[str, Any] | None = None
    if ticket.issue_type in cfg.defect_issue_types:
        try:
            dup_result = deps.duplicates(ticket)
        except RetrievalError as exc:
            notes.append(f"duplicate check unavailable: {exc}")
    dup_candidates: list[dict[str, Any]] = []
    if dup_result and dup_result.get("verdict") in ("duplicate", "possible"):
        dup_candidates = [c for c in dup_result.get("candidates") or [] if c.get("key") != ticket.key]
    forbidden = screen_forbidden(ticket, cfg)
    offline = classify_offline(ticket, evidence, taxonomy, cfg)
    usage = Usage()
    answer: LlmAnswer | None = None
    llm_error: str | None = None
    fallback: str | None = None
    used_mode, model = "offline", None
    attempts = 0
    if mode != "offline" and deps.llm is not None:
        try:
            outcome = classify_with_llm(create=deps.llm(run_id), model=deps.model, prefix=deps.prefix,
                                        tool=deps.tool, ticket=ticket, evidence=evidence,
                                        duplicates=dup_candidates, taxonomy=taxonomy, cfg=cfg, prices=deps.prices)
            used_mode, model, usage, attempts = "llm", deps.model, outcome.usage, outcome.attempts
            answer, llm_error = outcome.answer, outcome.error
        except BudgetDenied as exc:
            fallback = f"budget denied: {exc}"
        except LlmUnavailable as exc:
            fallback = f"LLM unavailable: {exc}"
    elif mode != "offline":
        fallback = "LLM mode not configured"
    result = classification_from_llm(answer, evidence, dup_candidates, cfg) if answer is not None else offline
    if used_mode == "llm" and answer is None:
        # Malformed twice: keep the offline figures for the human, but escalate (never guess).
        result = offline
    reasons = escalation_reasons(mode=used_mode, result=result, offline=offline, forbidden=forbidden,
                                 answer=answer, llm_error=llm_error, ticket=ticket, cfg=cfg)
    proposals: list[Proposal] = []
    escalation: dict[str, Any] | None = None
    if reasons:
        escalation = build_escalation(run_id=run_id, ticket=ticket, mode=used_mode, result=result, reasons=reasons)
    else:
        proposals = build_proposals(ticket_key=ticket.key, mode=used_mode, result=result,
                                    duplicates=dup_candidates, taxonomy=taxonomy, cfg=cfg)
    return TriageOutcome(ticket=ticket, run_id=run_id, mode=used_mode, model=model, result=result, offline=offline,
                         evidence=evidence, duplicates=dup_result, reasons=reasons, proposals=proposals,
                         escalation=escalation, usage=usage, notes=notes, fallback_reason=fallback,
                         llm_attempts=attempts)


# --------------------------------------------------------------------------- rendering and submission

def _vote_dict(fv: FieldVote) -> dict[str, Any]:
    return {"value": fv.value, "confidence": fv.confidence}


def outcome_as_dict(o: TriageOutcome) -> dict[str, Any]:
    """The JSON answer of `POST /v1/triage` (before guardrails' answers are added)."""
    r = o.result
    refs: list[dict[str, Any]] = []
    by_key = {e.key: e for e in o.evidence}
    dup_by_key = {str(d.get("key")): d for d in (o.duplicates or {}).get("candidates") or []}
    for key in r.references:
        if key in by_key:
            e = by_key[key]
            refs.append({"key": e.key, "kind": e.kind, "score": e.score, "summary": e.summary, "url": e.url})
        elif key in dup_by_key:
            d = dup_by_key[key]
            refs.append({"key": key, "kind": "duplicate", "score": float(d.get("score") or 0),
                         "summary": str(d.get("summary") or ""), "url": None})
    category = r.category.value or "other"
    return {
        "ticket_key": o.ticket.key,
        "run_id": o.run_id,
        "mode": o.mode,
        "model": o.model,
        "fallback_reason": o.fallback_reason,
        "category": category,
        "priority": r.priority.value,
        "component": r.component.value,
        "confidences": {"category": r.category.confidence, "priority": r.priority.confidence,
                        "component": r.component.confidence},
        "confidence": r.confidence,
        "suggested_resolution": r.suggested_resolution,
        "references": refs,
        "evidence_vote": {"category": _vote_dict(o.offline.category), "priority": _vote_dict(o.offline.priority),
                          "component": _vote_dict(o.offline.component), "confidence": o.offline.confidence},
        "duplicates": o.duplicates,
        "needs_human": o.needs_human,
        "reasons": [{"code": x.code, "detail": x.detail} for x in o.reasons],
        "proposals": [p.as_dict(o.run_id) for p in o.proposals],
        "escalation": o.escalation,
        "truncation": {"summary_chars": o.ticket.summary_truncated_from is not None,
                       "description": o.ticket.description_truncated_from is not None,
                       "description_original_chars": o.ticket.description_truncated_from,
                       "description_limit_chars": o.ticket.description_chars_limit},
        "notes": o.notes,
        "cost": o.usage.as_dict(),
        "llm_attempts": o.llm_attempts,
    }


class GuardrailsError(Exception):
    """Guardrails refused or failed a proposal / escalation (status and problem body attached)."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None

    @property
    def permanent(self) -> bool:
        """Guardrails refused this request itself (invalid, forbidden, a reused idempotency key): no retry of
        the same request can succeed. 404 / 408 / 429 and other 409s may pass later; 5xx and no answer too."""
        if self.status is None or not 400 <= self.status < 500:
            return False
        return self.status not in (404, 408, 409, 429) or self.code == "idempotency_key_reused"


def _refused(exc: GuardrailsError) -> dict[str, Any]:
    return {"status": "refused", "http_status": exc.status, "code": exc.code, "error": str(exc)}


def submit(response: Mapping[str, Any], guardrails: Any) -> dict[str, Any]:
    """Send the stored proposals (or the escalation) to guardrails; idempotency keys make a resend safe.

    Each proposal stands alone: one that guardrails refuses for good (a reused idempotency key, an invalid
    payload) is recorded as `refused` with guardrails' code and the others are still proposed. A transient
    failure raises, and the caller retries the whole submission (accepted proposals replay by their keys).
    The first refusal is also summarised at the top (`status`, `code`, `error`) for the run's outcome.
    """
    actions: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []
    for p in response.get("proposals") or []:
        head = {"connector": p["connector"], "operation": p["operation"], "target": p["target"],
                "idempotency_key": p["idempotency_key"]}
        try:
            answer = guardrails.propose(dict(p))
        except GuardrailsError as exc:
            if not exc.permanent:
                raise
            refusals.append(_refused(exc))
            actions.append({**head, **refusals[-1]})
            continue
        actions.append({**head, **{k: answer.get(k) for k in (
            "id", "status", "approval_id", "rule", "mode", "policy_reason", "expires_at") if k in answer}})
    escalation = None
    if response.get("escalation"):
        try:
            answer = guardrails.escalate(dict(response["escalation"]))
            escalation = {k: answer.get(k) for k in ("id", "status", "subject") if k in answer}
        except GuardrailsError as exc:
            if not exc.permanent:
                raise
            refusals.append(_refused(exc))
            escalation = dict(refusals[-1])
    out: dict[str, Any] = {"actions": actions, "escalation": escalation}
    if refusals:
        first = refusals[0]
        out.update(status=first["http_status"], code=first["code"], error=first["error"])
    return out


# --------------------------------------------------------------------------- intake (webhooks and polling)

ACCEPTED_EVENTS = frozenset({"jira:issue_created"})


# A delivery that must not be triaged: recorded, answered with a 4xx, nothing runs (shared with dedupe's intake).
IntakeRejected = WebhookRejected


def parse_webhook(body: bytes, signature: str | None, secret: str | None) -> tuple[str, dict[str, Any]]:
    """Verify the signature first (nothing is parsed from an unsigned body), then the event and the issue."""
    return parse_jira_webhook(body, signature, secret, events=ACCEPTED_EVENTS, purpose="triaged")


def external_id(issue: Mapping[str, Any]) -> str:
    """The run's external id: one per Jira issue, so webhook redeliveries and the polling twin share it."""
    return issue_external_id(issue)
