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


def _part(name: str, value: float, cap: float, weight: float, explanation: str) -> ScorePart:
    norm = 0.0 if cap <= 0 else min(1.0, max(0.0, value / cap))
    return ScorePart(name, round(value, 2), round(norm, 4), weight, round(norm * weight, 2), explanation)


def attention_scores(tickets: Sequence[Ticket], rules: WeeklyRules, now: datetime, *,
                     customer_value: Mapping[str, float] | None = None) -> list[ScoredTicket]:
    """Score every open ticket (0..100 = sum of weight × normalised part), highest first."""
    customer_value = customer_value or {}
    top_value = max(customer_value.values(), default=0.0)
    clients_of = {t.key: t.clients for t in tickets}
    w, caps = rules.weights, rules.caps
    scored: list[ScoredTicket] = []
    for t in tickets:
        if not t.is_open:
            continue
        # Clients affected: the ticket's own plus those of reports marked as its duplicates.
        clients = list(t.clients)
        for dup in t.duplicated_by:
            clients.extend(clients_of.get(dup, ()))
        clients_t = tuple(dict.fromkeys(clients))
        prio_points = rules.priority_points.get(t.priority or "", rules.priority_points_default)
        age = days_between(t.created, now)
        idle = days_between(t.updated, now)
        value = sum(customer_value.get(c, 0.0) for c in clients_t)
        parts = (
            ScorePart("priority", prio_points, prio_points, w["priority"], round(prio_points * w["priority"], 2),
                      f"priority {t.priority or 'none'} counts {prio_points:g}"),
            _part("age", age, caps["age_days"], w["age"], f"open {age:.0f} days (full at {caps['age_days']:g})"),
            _part("staleness", idle, caps["stale_days"], w["staleness"],
                  f"no update for {idle:.0f} days (full at {caps['stale_days']:g})"),
            _part("clients", len(clients_t), caps["clients"], w["clients"],
                  f"{len(clients_t)} client(s) affected (full at {caps['clients']:g})"),
            _part("duplicates", len(t.duplicated_by), caps["duplicates"], w["duplicates"],
                  f"{len(t.duplicated_by)} duplicate report(s) (full at {caps['duplicates']:g})"),
            _part("reopenings", t.reopen_count, caps["reopenings"], w["reopenings"],
                  f"reopened {t.reopen_count} time(s) (full at {caps['reopenings']:g})"),
            _part("customer_value", value, top_value, w["customer_value"],
                  (f"affected clients' value {value:,.0f} vs largest account {top_value:,.0f}" if top_value
                   else "no customer value known (Salesforce not configured or no matching account)")),
        )
        score = round(sum(p.points for p in parts), 2)
        scored.append(ScoredTicket(t, score, parts, clients_t))
    scored.sort(key=lambda s: (-s.score, -s.parts[0].value, s.ticket.key))
    return scored
