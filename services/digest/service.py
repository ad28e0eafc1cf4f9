"""The digest jobs: monitor, weekly digest, patterns, health — fetch, compute, narrate, render, archive.

A job either archives one complete digest (one transaction) and returns it, or raises: nothing
partial is ever returned as if complete, so n8n delivers only finished digests.
"""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool

from shared.connectors.http import ConnectorError
from shared.db import transaction
from shared.embeddings import Embedder, EmbedderUnavailable

from . import metrics, repository
from .config import DigestConfig, HealthRules, MonitorRules, PatternRules, WeeklyRules
from .health import Account, ClientHealth, DocState, accounts_from_records, cases_from_records, health_scores
from .narrative import LLM, Narrative, write_narrative
from .patterns import Pattern, find_patterns, pattern_text
from .render import MAX_ITEMS, Item, Report, render_all
from .rules import Finding, ScoredTicket, attention_scores, evaluate_monitor
from .sources import Sources, SourceUnavailable, iter_issues, jql_and, jql_time, source_error
from .tickets import Ticket, parse_time, ticket_from_issue

log = logging.getLogger(__name__)
MAX_LISTED_FINDINGS = 1000  # archived and returned; a scan with more says how many were left out


@dataclass
class Deps:
    """What every job needs, built once per process by the app factory."""

    config: DigestConfig
    sources: Sources
    pool: ConnectionPool
    llm_for_run: Callable[[str | None], tuple[LLM | None, str]] = lambda run_id: (None, "no LLM configured")
    embedder: Callable[[], Embedder] | None = None


@dataclass
class JobRequest:
    """The common request of every job (after schema validation)."""

    run_id: str | None = None
    now: datetime | None = None
    jql: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    narrative: str = "offline"           # auto (LLM when available) | offline
    clients: list[str] | None = None

    def as_of(self) -> datetime:
        return (self.now or datetime.now(timezone.utc)).astimezone(timezone.utc)


def ticket_url(deps: Deps, key: str) -> str | None:
    base = deps.config.jira.browse_url or deps.sources.browse_url
    return f"{base.rstrip('/')}/browse/{key}" if base else None


class Timer:
    """Wall time per phase of a job (reported in the digest's data, so slow sources are visible)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - t0, 3)


def fetch_tickets(deps: Deps, jql: str, *, description: bool = False) -> tuple[list[Ticket], int]:
    """Every issue of the JQL as Tickets (all pages); the count of issues read."""
    jira = deps.sources.require_jira()
    cfg = deps.config.jira
    out: dict[str, Ticket] = {}
    n = 0
    for issue in iter_issues(jira, jql, cfg.fields(description=description), cfg.page_size):
        n += 1
        t = ticket_from_issue(issue, cfg)
        out[t.key] = t
    return list(out.values()), n


def fetch_accounts(deps: Deps) -> tuple[list[Account], list[dict[str, Any]] | None]:
    """Salesforce accounts with their raw records; empty when Salesforce is not configured."""
    sf = deps.sources.salesforce
    if sf is None:
        return [], None
    try:
        records = sf.query_all(deps.config.salesforce.accounts_soql)
    except ConnectorError as exc:
        raise source_error("Salesforce", exc) from exc
    return accounts_from_records(records, deps.config.salesforce), records


def fetch_cases(deps: Deps) -> list[dict[str, Any]]:
    """Open Salesforce cases (the configured SOQL); empty when Salesforce is not configured."""
    sf = deps.sources.salesforce
    if sf is None:
        return []
    try:
        return sf.query_all(deps.config.salesforce.cases_soql)
    except ConnectorError as exc:
        raise source_error("Salesforce", exc) from exc


def fetch_doc(deps: Deps, page_id: str) -> DocState:
    """The page's last substantive edit: the newest version not marked as a minor edit."""
    conf = deps.sources.confluence
    assert conf is not None
    try:
        page = conf.get_page(page_id)
    except ConnectorError as exc:
        if exc.status == 404:
            return DocState(page_id, f"page {page_id}", None, None, missing=True)
        raise source_error("Confluence", exc) from exc
    title = str(page.get("title") or f"page {page_id}")
    try:
        for v in conf.page_versions(page_id):
            if not v.get("minorEdit"):
                return DocState(page_id, title, parse_time(v.get("createdAt")), v.get("number"))
    except ConnectorError as exc:
        raise source_error("Confluence", exc) from exc
    current = page.get("version") or {}
    return DocState(page_id, title, parse_time(current.get("createdAt")), current.get("number"))


# --------------------------------------------------------------------------- archive

def _existing(deps: Deps, kind: str, run_id: str | None) -> dict[str, Any] | None:
    if not run_id:
        return None
    with deps.pool.connection() as conn:
        return repository.get_digest_by_run(conn, kind=kind, run_id=run_id)


def _archive(deps: Deps, *, digest_id: uuid.UUID, kind: str, req: JobRequest, as_of: datetime,
             params: dict[str, Any], summary: dict[str, Any], data: dict[str, Any], report: Report,
             narrative: Narrative, after: Callable[[psycopg.Connection[Any]], None] | None = None) -> dict[str, Any]:
    """Render and store the digest (and job rows via `after`) in one transaction."""
    rendered = render_all(report)
    digest = {"id": digest_id, "kind": kind, "run_id": req.run_id, "as_of": as_of, "params": params,
              "summary": summary, "data": data, "narrative": narrative.text, "narrative_mode": narrative.mode,
              "narrative_reason": narrative.reason, "narrative_model": narrative.model,
              "slack": rendered["slack"], "email_subject": rendered["email"]["subject"],
              "email_html": rendered["email"]["html"], "email_text": rendered["email"]["text"],
              "markdown": rendered["markdown"]}
    try:
        with transaction(deps.pool) as conn:
            row = repository.insert_digest(conn, digest=digest)
            if after:
                after(conn)
    except psycopg.errors.UniqueViolation:
        # The same run finished the job concurrently (n8n retried): its digest is the answer.
        existing = _existing(deps, kind, req.run_id)
        if existing is None:
            raise
        return existing
    metrics.LAST_SUCCESS.labels(kind).set(time.time())
    metrics.NARRATIVES.labels(kind, narrative.mode).inc()
    return row


def _narrate(deps: Deps, req: JobRequest, *, facts: dict[str, Any], keys: set[str], offline: str) -> Narrative:
    if req.narrative != "auto":
        return Narrative(offline, "offline", "offline narrative requested")
    llm, why = deps.llm_for_run(req.run_id)
    return write_narrative(facts=facts, allowed_keys=keys, offline_text=offline, llm=llm, cfg=deps.config.narrative,
                           offline_reason=why)


def _context(scanned: int, jql: str, as_of: datetime, run_id: str | None) -> str:
    run = f" · run {run_id}" if run_id else ""
    return f"{scanned} tickets read with JQL `{jql}` · as of {as_of:%Y-%m-%d %H:%M} UTC{run}"


def _footer(digest_id: uuid.UUID) -> str:
    return f"Digest {digest_id} · archived in Metis (GET /v1/digests/{digest_id})"


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def _ticket_brief(deps: Deps, t: Ticket) -> dict[str, Any]:
    return {"key": t.key, "summary": t.summary, "url": ticket_url(deps, t.key), "priority": t.priority,
            "status": t.status, "assignee": t.assignee, "clients": list(t.clients), "created": _iso(t.created),
            "updated": _iso(t.updated)}


def _timed(kind: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                metrics.JOB_FAILURES.labels(kind, getattr(exc, "code", type(exc).__name__)).inc()
                raise
            metrics.JOB_SECONDS.labels(kind).observe(time.perf_counter() - t0)
            return result
        run.__name__, run.__doc__ = fn.__name__, fn.__doc__
        return run
    return deco


# --------------------------------------------------------------------------- monitor

@_timed("monitor")
def run_monitor(deps: Deps, req: JobRequest) -> dict[str, Any]:
    """Daily defect monitoring: stale (per priority), blockers, waiting too long — each with its reasons."""
    if (found := _existing(deps, "monitor", req.run_id)) is not None:
        return found
    rules: MonitorRules = deps.config.with_overrides("monitor", req.overrides)
    jql = req.jql or rules.jql
    as_of = req.as_of()
    timer = Timer()
    with timer("jira"):
        tickets, scanned = fetch_tickets(deps, jql)
    with timer("rules"):
        findings = evaluate_monitor(tickets, rules, as_of)
    counts = Counter(r.rule for f in findings for r in {r.rule: r for r in f.reasons}.values())
    metrics.export_findings(dict(counts))
    digest_id = uuid.uuid4()
    listed = findings[:MAX_LISTED_FINDINGS]
    data = {"scanned": scanned, "findings_total": len(findings), "counts": dict(counts), "timings": timer.seconds,
            "findings": [{**_ticket_brief(deps, f.ticket), "days_since_update": round(f.days_since_update, 1),
                          "reasons": [asdict(r) for r in f.reasons]} for f in listed]}
    shown = findings[:min(rules.show, MAX_ITEMS)]
    offline = _monitor_text(findings, counts, scanned)
    facts = {"scanned": scanned, "counts": dict(counts),
             "most_urgent": [{"key": f.ticket.key, "priority": f.ticket.priority,
                              "reasons": [r.detail for r in f.reasons]} for f in shown[:10]]}
    narrative = _narrate(deps, req, facts=facts, keys={f.ticket.key for f in shown[:10]}, offline=offline)
    report = Report(
        kind="monitor", title=f"Defect monitor — {as_of:%Y-%m-%d}: {len(findings)} need a look",
        context=_context(scanned, jql, as_of, req.run_id), narrative=narrative.text,
        narrative_note=narrative.note,
        facts=tuple(f"{rule}: {counts.get(rule, 0)}" for rule in metrics.RULES),
        items=tuple(_finding_item(deps, f) for f in shown), hidden=len(findings) - len(shown),
        empty_text="No open defect is stale, blocked or waiting too long.", footer=_footer(digest_id))
    params = {"jql": jql, "rules": deps.config.raw["monitor"] | (req.overrides or {})}
    summary = {"scanned": scanned, "findings": len(findings), "counts": dict(counts)}
    return _archive(deps, digest_id=digest_id, kind="monitor", req=req, as_of=as_of, params=params,
                    summary=summary, data=data, report=report, narrative=narrative)


def _finding_item(deps: Deps, f: Finding) -> Item:
    t = f.ticket
    badge = " · ".join(x for x in (t.priority, t.status, t.assignee or "unassigned",
                                   ", ".join(t.clients)) if x)
    return Item(title=t.summary, key=t.key, url=ticket_url(deps, t.key), badge=badge,
                lines=tuple(f"{r.rule}: {r.detail}" for r in f.reasons))


def _monitor_text(findings: Sequence[Finding], counts: Mapping[str, int], scanned: int) -> str:
    if not findings:
        return f"All {scanned} open defects are within their rules today."
    top = findings[0]
    parts = [f"{len(findings)} of {scanned} open defects need a look today"]
    detail = [f"{counts[r]} {label}" for r, label in (("blocker", "at blocker priority"), ("blocked", "blocked"),
                                                     ("flagged", "flagged"), ("stale", "stale"),
                                                     ("waiting", "waiting too long")) if counts.get(r)]
    text = parts[0] + (": " + ", ".join(detail) if detail else "") + "."
    return text + f" Most urgent: {top.ticket.key} ({top.reasons[0].detail})."


# --------------------------------------------------------------------------- weekly

@_timed("weekly")
def run_weekly(deps: Deps, req: JobRequest) -> dict[str, Any]:
    """The weekly 'N defects that need attention', ranked by the transparent attention score."""
    if (found := _existing(deps, "weekly", req.run_id)) is not None:
        return found
    rules: WeeklyRules = deps.config.with_overrides("weekly", req.overrides)
    jql = req.jql or rules.jql
    as_of = req.as_of()
    timer = Timer()
    with timer("jira"):
        tickets, scanned = fetch_tickets(deps, jql)
    with timer("salesforce"):
        accounts, _ = fetch_accounts(deps)
    value = {a.client: a.value for a in accounts if a.value is not None}
    with timer("score"):
        top = attention_scores(tickets, rules, as_of, customer_value=value, limit=rules.limit)
    open_count = sum(1 for t in tickets if t.is_open)
    digest_id = uuid.uuid4()
    data = {"scanned": scanned, "open": open_count, "limit": rules.limit, "weights": dict(rules.weights),
            "caps": dict(rules.caps), "customer_value_source": "salesforce" if deps.sources.salesforce else None,
            "timings": timer.seconds,
            "tickets": [_scored_brief(deps, s) for s in top]}
    facts = {"week_ending": f"{as_of:%Y-%m-%d}", "open_defects": open_count, "listed": len(top),
             "score_weights": dict(rules.weights),
             "tickets": [{"key": s.ticket.key, "summary": s.ticket.summary, "priority": s.ticket.priority,
                          "status": s.ticket.status, "score": s.score, "clients": list(s.clients),
                          "score_parts": {p.name: p.points for p in s.parts if p.points > 0},
                          "why": [p.explanation for p in s.parts if p.points > 0]} for s in top]}
    offline = _weekly_text(top, open_count)
    narrative = _narrate(deps, req, facts=facts, keys={s.ticket.key for s in top}, offline=offline)
    report = Report(
        kind="weekly", title=f"Weekly digest — the {len(top)} defects that need attention ({as_of:%Y-%m-%d})",
        context=_context(scanned, jql, as_of, req.run_id), narrative=narrative.text,
        narrative_note=narrative.note,
        facts=(f"score = sum of weight × part (0–1); weights: " +
               ", ".join(f"{k} {v:g}" for k, v in rules.weights.items()),),
        items=tuple(_scored_item(deps, s) for s in top),
        empty_text="No open defects.", footer=_footer(digest_id))
    params = {"jql": jql, "rules": deps.config.raw["weekly"] | (req.overrides or {}), "narrative": req.narrative}
    summary = {"scanned": scanned, "open": open_count, "listed": len(top),
               "top": [{"key": s.ticket.key, "score": s.score} for s in top[:3]]}
    return _archive(deps, digest_id=digest_id, kind="weekly", req=req, as_of=as_of, params=params,
                    summary=summary, data=data, report=report, narrative=narrative)


def _scored_brief(deps: Deps, s: ScoredTicket) -> dict[str, Any]:
    return {**_ticket_brief(deps, s.ticket), "clients_affected": list(s.clients), "score": s.score,
            "duplicates": list(s.ticket.duplicated_by), "reopen_count": s.ticket.reopen_count,
            "parts": [asdict(p) for p in s.parts]}


def _scored_item(deps: Deps, s: ScoredTicket) -> Item:
    t = s.ticket
    parts = ", ".join(f"{p.name} {p.points:g}/{p.weight:g}" for p in s.parts)
    why = [p.explanation for p in sorted(s.parts, key=lambda p: -p.points) if p.points > 0][:4]
    badge = " · ".join(x for x in (f"score {s.score:g}", t.priority, t.status,
                                   ", ".join(s.clients)) if x)
    return Item(title=t.summary, key=t.key, url=ticket_url(deps, t.key), badge=badge,
                lines=(f"parts: {parts}", *why))


def _weekly_text(top: Sequence[ScoredTicket], open_count: int) -> str:
    if not top:
        return "There are no open defects this week."
    lead = top[0]
    best = sorted((p for p in lead.parts if p.points > 0), key=lambda p: -p.points)[:2]
    text = (f"These {len(top)} of {open_count} open defects need attention this week. {lead.ticket.key} leads "
            f"with a score of {lead.score:g}" + (" (" + "; ".join(p.explanation for p in best) + ")" if best else "")
            + ".")
    multi = [s.ticket.key for s in top if len(s.clients) > 1]
    if multi:
        text += f" {len(multi)} affect more than one client: {', '.join(multi[:5])}."
    dup = [s.ticket.key for s in top if s.ticket.duplicated_by]
    if dup:
        text += f" {len(dup)} have duplicate reports: {', '.join(dup[:5])}."
    return text


# --------------------------------------------------------------------------- patterns

EMBED_CHUNK = 2000  # vectors stored per transaction: a first run cut short still leaves progress behind


def embed_tickets(deps: Deps, tickets: Sequence[Ticket], rules: PatternRules) -> tuple[np.ndarray, int, int]:
    """Vectors for the tickets, reusing cached ones whose text is unchanged; (vectors, embedded, cached).

    Identical texts (the same summary from several clients) are embedded once."""
    if deps.embedder is None:
        raise SourceUnavailable("no embedding model is configured", extra={"source": "embedder"})
    try:
        embedder = deps.embedder()
    except EmbedderUnavailable as exc:
        raise SourceUnavailable(str(exc), extra={"source": "embedder"}) from exc
    if not tickets:
        return np.zeros((0, embedder.dim), dtype=np.float32), 0, 0
    texts = [pattern_text(t, rules.description_chars) for t in tickets]
    hashes = [hashlib.sha256(x.encode()).digest()[:16] for x in texts]
    keys = [t.key for t in tickets]
    with deps.pool.connection() as conn:
        cached = repository.cached_embeddings(conn, model=embedder.name, keys=keys)
    out = np.zeros((len(tickets), embedder.dim), dtype=np.float32)
    by_hash: dict[bytes, list[int]] = {}
    for i, (k, h) in enumerate(zip(keys, hashes)):
        hit = cached.get(k)
        if hit is not None and hit[0] == h:
            out[i] = hit[1]
        else:
            by_hash.setdefault(h, []).append(i)
    todo = list(by_hash.values())
    for start in range(0, len(todo), EMBED_CHUNK):
        chunk = todo[start:start + EMBED_CHUNK]
        try:
            vecs = np.asarray(embedder.embed([texts[group[0]] for group in chunk]), dtype=np.float32)
        except EmbedderUnavailable as exc:
            raise SourceUnavailable(str(exc), extra={"source": "embedder"}) from exc
        rows = []
        for group, vec in zip(chunk, vecs):
            out[group] = vec
            rows += [(keys[i], hashes[i], vec) for i in group]
        # The cache is its own unit of work: vectors are right whether or not this job finishes.
        with transaction(deps.pool) as conn:
            repository.store_embeddings(conn, model=embedder.name, rows=rows)
    missing = sum(len(g) for g in todo)
    return out, missing, len(tickets) - missing


@_timed("patterns")
def run_patterns(deps: Deps, req: JobRequest) -> dict[str, Any]:
    """Weekly cross-client patterns: clusters in the window spanning several clients, trend vs the one before."""
    if (found := _existing(deps, "patterns", req.run_id)) is not None:
        return found
    rules: PatternRules = deps.config.with_overrides("patterns", req.overrides)
    base = req.jql or rules.jql
    as_of = req.as_of()
    start = as_of - timedelta(days=rules.window_days)
    prev_start = start - timedelta(days=rules.window_days)
    jql = jql_and(base, f"created >= {jql_time(prev_start)}", f"created < {jql_time(as_of)}",
                  order_by="created ASC")
    timer = Timer()
    with timer("jira"):
        tickets, scanned = fetch_tickets(deps, jql, description=rules.description_chars > 0)
    current = [t for t in tickets if start <= t.created < as_of]
    previous = [t for t in tickets if prev_start <= t.created < start]
    if deps.embedder is not None:
        with timer("model"):  # loads on first use; reported apart from the embedding itself
            try:
                deps.embedder()
            except EmbedderUnavailable as exc:
                raise SourceUnavailable(str(exc), extra={"source": "embedder"}) from exc
    with timer("embed"):
        vecs, new, cached = embed_tickets(deps, current + previous, rules)
    with timer("cluster"):
        patterns = find_patterns(current, vecs[:len(current)], previous, vecs[len(current):], rules)
    trends = Counter(p.trend for p in patterns)
    metrics.export_patterns(dict(trends))
    digest_id = uuid.uuid4()
    shown = patterns[:rules.show]
    data = {"window": {"start": start.isoformat(), "end": as_of.isoformat(), "days": rules.window_days},
            "previous_window": {"start": prev_start.isoformat(), "end": start.isoformat()},
            "scanned": {"current": len(current), "previous": len(previous), "read": scanned},
            "embedded": {"new": new, "cached": cached}, "timings": timer.seconds,
            "similarity": rules.similarity, "patterns": [_pattern_brief(deps, p) for p in patterns]}
    facts = {"window_days": rules.window_days, "tickets_in_window": len(current),
             "patterns": [{"representative": p.representative.key, "summary": p.representative.summary,
                           "tickets": p.count, "clients": [c for c, _ in p.clients],
                           "previous_window_tickets": p.previous_count, "trend": p.trend} for p in shown]}
    offline = _patterns_text(patterns, len(current), rules)
    narrative = _narrate(deps, req, facts=facts, keys={t.key for p in shown for t in p.tickets}, offline=offline)
    report = Report(
        kind="patterns", title=f"Cross-client patterns — last {rules.window_days:g} days ({as_of:%Y-%m-%d})",
        context=_context(scanned, jql, as_of, req.run_id), narrative=narrative.text, narrative_note=narrative.note,
        facts=(f"{len(current)} tickets in the window, {len(previous)} in the previous one",
               f"a pattern: ≥ {rules.min_tickets} tickets ≥ {rules.similarity:g} similar to its representative, "
               f"from ≥ {rules.min_clients} clients"),
        items=tuple(_pattern_item(deps, p, rules) for p in shown), hidden=len(patterns) - len(shown),
        empty_text="No issue recurs across clients in this window.", footer=_footer(digest_id))
    params = {"jql": jql, "rules": deps.config.raw["patterns"] | (req.overrides or {})}
    summary = {"tickets": len(current), "patterns": len(patterns), "trends": dict(trends)}
    return _archive(deps, digest_id=digest_id, kind="patterns", req=req, as_of=as_of, params=params,
                    summary=summary, data=data, report=report, narrative=narrative)


def _pattern_brief(deps: Deps, p: Pattern) -> dict[str, Any]:
    return {"representative": _ticket_brief(deps, p.representative), "count": p.count,
            "clients": [{"client": c, "tickets": n} for c, n in p.clients],
            "previous_count": p.previous_count, "previous_clients": list(p.previous_clients), "trend": p.trend,
            "cohesion": p.cohesion, "components": list(p.components),
            "tickets": [{"key": t.key, "summary": t.summary, "clients": list(t.clients), "similarity": s,
                         "created": _iso(t.created), "url": ticket_url(deps, t.key)}
                        for t, s in zip(p.tickets, p.similarity)]}


def _pattern_item(deps: Deps, p: Pattern, rules: PatternRules) -> Item:
    rep = p.representative
    keys = ", ".join(t.key for t in p.tickets[:12]) + (f" and {p.count - 12} more" if p.count > 12 else "")
    lines = [
        "clients: " + ", ".join(f"{c} ({n})" for c, n in p.clients),
        f"previous {rules.window_days:g} days: {p.previous_count} similar ticket(s) → {p.trend}",
        f"tickets: {keys}",
    ]
    if p.components:
        lines.append("components: " + ", ".join(p.components))
    return Item(title=rep.summary, key=rep.key, url=ticket_url(deps, rep.key),
                badge=f"{p.count} tickets · {len(p.clients)} clients · {p.trend}", lines=tuple(lines))


def _patterns_text(patterns: Sequence[Pattern], in_window: int, rules: PatternRules) -> str:
    if not patterns:
        return f"No issue recurred across {rules.min_clients} or more clients among {in_window} tickets in the last " \
               f"{rules.window_days:g} days."
    p = patterns[0]
    rising = [x.representative.key for x in patterns if x.trend in ("rising", "new")]
    text = (f"{len(patterns)} issue(s) recur across clients in the last {rules.window_days:g} days. The widest, "
            f"around {p.representative.key}, has {p.count} tickets from {len(p.clients)} clients "
            f"({p.trend}; {p.previous_count} in the previous window).")
    if rising:
        text += f" New or rising: {', '.join(rising[:5])}."
    return text


# --------------------------------------------------------------------------- health

@_timed("health")
def run_health(deps: Deps, req: JobRequest) -> dict[str, Any]:
    """Daily client health 0–100 from Jira, Salesforce and Confluence, with history and gauges."""
    if (found := _existing(deps, "health", req.run_id)) is not None:
        return found
    rules: HealthRules = deps.config.with_overrides("health", req.overrides)
    base = req.jql or rules.jql
    as_of = req.as_of()
    since = as_of - timedelta(days=rules.lookback_days)
    jql = jql_and(base, f"statusCategory != Done OR resolved >= {jql_time(since)}")
    timer = Timer()
    with timer("jira"):
        tickets, scanned = fetch_tickets(deps, jql)
    with timer("salesforce"):
        accounts, _ = fetch_accounts(deps)
        cases = cases_from_records(fetch_cases(deps)) if deps.sources.salesforce else []
    docs: dict[str, DocState] = {}
    wanted = set(req.clients) if req.clients else None
    with timer("confluence"):
        if deps.sources.confluence is not None:
            for a in accounts:
                if a.config_page_id and (wanted is None or a.client in wanted) and a.config_page_id not in docs:
                    docs[a.config_page_id] = fetch_doc(deps, a.config_page_id)
    scores = health_scores(tickets, rules, as_of, accounts=accounts, cases=cases, docs=docs,
                           salesforce_configured=deps.sources.salesforce is not None,
                           confluence_configured=deps.sources.confluence is not None, clients=req.clients)
    with deps.pool.connection() as conn:
        previous = repository.previous_health(conn, before=as_of, clients=[h.client for h in scores])
    rows = [_health_row(h, previous.get(h.client)) for h in scores]
    digest_id = uuid.uuid4()
    data = {"clients": rows, "sources": {"jira": True, "salesforce": deps.sources.salesforce is not None,
                                         "confluence": deps.sources.confluence is not None},
            "weights": dict(rules.weights), "scanned": scanned, "timings": timer.seconds}
    offline = _health_text(rows)
    facts = {"clients": [{"client": r["client"], "score": r["score"], "previous_score": r["previous_score"],
                          "weakest": [c["explanation"] for c in sorted(
                              (c for c in r["components"] if c["available"]), key=lambda c: c["score"])[:2]]}
                         for r in rows[:15]]}
    narrative = _narrate(deps, req, facts=facts, keys=set(), offline=offline)
    shown = rows[:MAX_ITEMS]
    report = Report(
        kind="health", title=f"Client health — {as_of:%Y-%m-%d}: {len(rows)} clients",
        context=_context(scanned, jql, as_of, req.run_id), narrative=narrative.text, narrative_note=narrative.note,
        facts=("score = weighted mean of the available components (0–100); weights: " +
               ", ".join(f"{k} {v:g}" for k, v in rules.weights.items()),),
        items=tuple(_health_item(r) for r in shown), hidden=len(rows) - len(shown),
        empty_text="No clients found in Jira or Salesforce.", footer=_footer(digest_id))
    params = {"jql": jql, "rules": deps.config.raw["health"] | (req.overrides or {}), "clients": req.clients}
    summary = {"clients": len(rows), "lowest": [{"client": r["client"], "score": r["score"]} for r in rows[:3]],
               "average": round(sum(r["score"] for r in rows) / len(rows), 1) if rows else None}

    def store_scores(conn: psycopg.Connection[Any]) -> None:
        repository.insert_health_scores(conn, digest_id=digest_id, as_of=as_of, rows=rows)

    digest = _archive(deps, digest_id=digest_id, kind="health", req=req, as_of=as_of, params=params,
                      summary=summary, data=data, report=report, narrative=narrative, after=store_scores)
    metrics.export_health(rows)
    return digest


def _health_row(h: ClientHealth, prev: dict[str, Any] | None) -> dict[str, Any]:
    prev_score = prev["score"] if prev else None
    return {"client": h.client, "name": h.name, "score": h.score, "previous_score": prev_score,
            "previous_as_of": _iso(prev["as_of"]) if prev else None,
            "delta": round(h.score - prev_score, 1) if prev_score is not None else None,
            "components": [asdict(c) for c in h.components]}


def _health_item(r: dict[str, Any]) -> Item:
    delta = r["delta"]
    trend = "first score" if delta is None else (f"{delta:+g} since {r['previous_as_of'][:10]}")
    lines = tuple(
        f"{c['name']}: {c['score']:g}/100 (weight {c['weight']:g}) — {c['explanation']}" if c["available"]
        else f"{c['name']}: no data — {c['explanation']}" for c in r["components"])
    title = r["name"] if r["name"] == r["client"] else f"{r['name']} ({r['client']})"
    return Item(title=title, badge=f"health {r['score']:g}/100 · {trend}", lines=lines)


def _health_text(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "No clients to score."
    low = rows[0]
    weakest = sorted((c for c in low["components"] if c["available"]), key=lambda c: c["score"])[:2]
    text = (f"{len(rows)} client(s) scored. Lowest: {low['name']} at {low['score']:g}/100"
            + (" (" + "; ".join(c["explanation"] for c in weakest) + ")" if weakest else "") + ".")
    drops = [r for r in rows if r["delta"] is not None and r["delta"] <= -5]
    if drops:
        text += " Dropped by 5 points or more since the last run: " + ", ".join(
            f"{r['name']} ({r['delta']:+g})" for r in drops[:5]) + "."
    return text


JOBS: dict[str, Callable[[Deps, JobRequest], dict[str, Any]]] = {
    "monitor": run_monitor, "weekly": run_weekly, "patterns": run_patterns, "health": run_health,
}
