"""Defect monitoring rules (stale, blocker, waiting) and the transparent attention score."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Mapping, Sequence

from .config import MonitorRules, WeeklyRules
from .tickets import Ticket

DAY = 86400.0


def days_between(earlier: datetime, later: datetime) -> float:
    """Days (fractional) from `earlier` to `later`, never negative."""
    return max(0.0, (later - earlier).total_seconds() / DAY)


@dataclass(frozen=True)
class Reason:
    """Why a ticket was picked: the rule and a sentence with the numbers that triggered it."""

    rule: str      # stale | blocker | blocked | flagged | waiting
    detail: str


@dataclass(frozen=True)
class Finding:
    ticket: Ticket
    reasons: tuple[Reason, ...]
    days_since_update: float
    # How far past its limit the ticket is (1.0 = exactly at the limit); orders findings.
    urgency: float


def evaluate_monitor(tickets: Iterable[Ticket], rules: MonitorRules, now: datetime) -> list[Finding]:
    """Open tickets matching any rule, each with every reason it matched, most urgent first."""
    waiting = {s.lower() for s in rules.waiting_statuses}
    blocker_priorities = {p.lower() for p in rules.blocker_priorities}
    findings: list[Finding] = []
    for t in tickets:
        if not t.is_open:
            continue
        reasons: list[Reason] = []
        idle = days_between(t.updated, now)
        limit = rules.stale_limit(t.priority)
        urgency = 0.0
        if idle > limit:
            reasons.append(Reason("stale", f"no update for {idle:.1f} days (limit for {t.priority or 'no priority'}: "
                                           f"{limit:g} days)"))
            urgency = max(urgency, idle / limit)
        if (t.priority or "").lower() in blocker_priorities:
            reasons.append(Reason("blocker", f"priority {t.priority}"))
            urgency = max(urgency, 10.0)
        if t.open_blockers:
            reasons.append(Reason("blocked", "is blocked by unresolved " + ", ".join(t.open_blockers)))
            urgency = max(urgency, 5.0)
        if t.flagged:
            reasons.append(Reason("flagged", "flagged as an impediment"))
            urgency = max(urgency, 5.0)
        if t.status.lower() in waiting:
            waited = days_between(t.status_since, now)
            if waited > rules.waiting_days:
                reasons.append(Reason("waiting", f"in '{t.status}' for {waited:.1f} days "
                                                 f"(limit {rules.waiting_days:g} days)"))
                urgency = max(urgency, waited / rules.waiting_days)
        if reasons:
            findings.append(Finding(t, tuple(reasons), idle, urgency))
    findings.sort(key=lambda f: (-f.urgency, -f.days_since_update, f.ticket.key))
    return findings


@dataclass(frozen=True)
class ScorePart:
    """One visible part of the attention score: raw value, normalised 0..1, weight, points earned."""

    name: str
    value: float
    normalized: float
    weight: float
    points: float
    explanation: str


@dataclass(frozen=True)
class ScoredTicket:
    ticket: Ticket
    score: float
    parts: tuple[ScorePart, ...]
    clients: tuple[str, ...]


def _norm(value: float, cap: float) -> float:
    return 0.0 if cap <= 0 else min(1.0, max(0.0, value / cap))


PART_NAMES = ("priority", "age", "staleness", "clients", "duplicates", "reopenings", "customer_value")


def _explain(t: Ticket, name: str, value: float, cap: float) -> str:
    if name == "priority":
        return f"priority {t.priority or 'none'} counts {value:g}"
    if name == "age":
        return f"open {value:.0f} days (full at {cap:g})"
    if name == "staleness":
        return f"no update for {value:.0f} days (full at {cap:g})"
    if name == "clients":
        return f"{value:g} client(s) affected (full at {cap:g})"
    if name == "duplicates":
        return f"{value:g} duplicate report(s) (full at {cap:g})"
    if name == "reopenings":
        return f"reopened {value:g} time(s) (full at {cap:g})"
    if cap:
        return f"affected clients' value {value:,.0f} vs largest account {cap:,.0f}"
    return "no customer value known (Salesforce not configured or no matching account)"


def attention_scores(tickets: Sequence[Ticket], rules: WeeklyRules, now: datetime, *,
                     customer_value: Mapping[str, float] | None = None,
                     limit: int | None = None) -> list[ScoredTicket]:
    """Score every open ticket (0..100 = sum of weight × normalised part), highest first; with `limit`, only
    the top ones are returned (the parts are spelled out only for those)."""
    customer_value = customer_value or {}
    top_value = max(customer_value.values(), default=0.0)
    clients_of = {t.key: t.clients for t in tickets}
    w, caps = rules.weights, rules.caps
    weights = tuple(w[n] for n in PART_NAMES)
    part_caps = (1.0, caps["age_days"], caps["stale_days"], caps["clients"], caps["duplicates"], caps["reopenings"],
                 top_value)
    rows: list[tuple[float, float, str, Ticket, tuple[str, ...], tuple[float, ...]]] = []
    for t in tickets:
        if not t.is_open:
            continue
        # Clients affected: the ticket's own plus those of reports marked as its duplicates.
        clients = list(t.clients)
        for dup in t.duplicated_by:
            clients.extend(clients_of.get(dup, ()))
        clients_t = tuple(dict.fromkeys(clients))
        raw: tuple[float, ...] = (rules.priority_points.get(t.priority or "", rules.priority_points_default),
               days_between(t.created, now), days_between(t.updated, now), float(len(clients_t)),
               float(len(t.duplicated_by)), float(t.reopen_count),
               float(sum(customer_value.get(c, 0.0) for c in clients_t)))
        # Points are rounded per part exactly as shown, so the shown parts add up to the score.
        score = round(sum(round(_norm(v, c) * wt, 2) for v, c, wt in zip(raw, part_caps, weights)), 2)
        rows.append((score, raw[0], t.key, t, clients_t, raw))
    rows.sort(key=lambda r: (-r[0], -r[1], r[2]))
    out = []
    for score, _, _, t, clients_t, values in rows[:limit] if limit is not None else rows:
        parts = tuple(ScorePart(name, round(v, 2), round(_norm(v, c), 4), wt, round(_norm(v, c) * wt, 2),
                                _explain(t, name, v, c))
                      for name, v, c, wt in zip(PART_NAMES, values, part_caps, weights))
        out.append(ScoredTicket(t, score, parts, clients_t))
    return out
