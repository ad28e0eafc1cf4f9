"""Per-client health 0–100 from Jira, Salesforce and Confluence, every component shown."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from .config import HealthRules, SalesforceConfig
from .rules import days_between
from .tickets import Ticket, parse_time


@dataclass(frozen=True)
class Account:
    """A Salesforce Account, reduced to what the digest uses."""

    account_id: str
    client: str
    name: str
    value: float | None = None
    renewal_date: date | None = None
    config_page_id: str | None = None
    config_changed: datetime | None = None


@dataclass(frozen=True)
class Case:
    account_id: str
    escalated: bool
    closed: bool


@dataclass(frozen=True)
class DocState:
    """The Confluence page documenting a client's configuration: when it was last edited."""

    page_id: str
    title: str
    last_edited: datetime | None
    version: int | None
    missing: bool = False


def _date(value: Any) -> date | None:
    if isinstance(value, str) and value:
        try:
            return date.fromisoformat(value[:10])
        except ValueError:
            return None
    return None


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def accounts_from_records(records: Iterable[Mapping[str, Any]], cfg: SalesforceConfig) -> list[Account]:
    """Salesforce Account records → Accounts; records without a client key are skipped (not Metis clients)."""
    f = cfg.fields
    out: list[Account] = []
    for r in records:
        client = r.get(f["client_key"])
        if not isinstance(client, str) or not client.strip():
            continue
        page = r.get(f.get("config_page_id", "")) if f.get("config_page_id") else None
        out.append(Account(
            account_id=str(r.get("Id") or ""),
            client=client.strip(),
            name=str(r.get(f.get("name", "Name")) or client),
            value=_float(r.get(f["value"])) if f.get("value") else None,
            renewal_date=_date(r.get(f["renewal_date"])) if f.get("renewal_date") else None,
            config_page_id=str(page).strip() if page not in (None, "") else None,
            config_changed=parse_time(r.get(f["config_changed"])) if f.get("config_changed") else None,
        ))
    return out


def cases_from_records(records: Iterable[Mapping[str, Any]]) -> list[Case]:
    """Salesforce Case records (AccountId, IsEscalated, IsClosed) → Cases."""
    return [Case(str(r.get("AccountId") or ""), bool(r.get("IsEscalated")), bool(r.get("IsClosed")))
            for r in records]


@dataclass(frozen=True)
class Component:
    """One visible component: its score 0..100, weight, the raw figure and why."""

    name: str
    source: str               # jira | salesforce | confluence
    available: bool
    score: float | None
    weight: float
    value: Any
    explanation: str


@dataclass(frozen=True)
class ClientHealth:
    client: str
    name: str
    score: float
    components: tuple[Component, ...]
    facts: dict[str, Any] = field(default_factory=dict)


def _penalty_score(value: float, cap: float) -> float:
    return round(100.0 * (1.0 - min(1.0, max(0.0, value) / cap)), 1)


def client_health(client: str, tickets: Sequence[Ticket], rules: HealthRules, now: datetime, *,
                  account: Account | None, cases: Sequence[Case] | None,
                  doc: DocState | None, salesforce_configured: bool, confluence_configured: bool) -> ClientHealth:
    """Score one client; components without data are shown as unavailable and left out of the average."""
    w, caps = rules.weights, rules.caps
    open_t = [t for t in tickets if t.is_open]
    points = sum(rules.severity_points.get(t.priority or "", rules.severity_points_default) for t in open_t)
    by_prio: dict[str, int] = {}
    for t in open_t:
        by_prio[t.priority or "none"] = by_prio.get(t.priority or "none", 0) + 1
    ages = [days_between(t.created, now) for t in open_t]
    median_age = statistics.median(ages) if ages else 0.0
    reopened = sum(1 for t in tickets if t.reopen_count > 0)
    rate = reopened / len(tickets) if tickets else 0.0
    escalated = sum(1 for t in open_t if t.escalated)
    comps: list[Component] = [
        Component("open_defects", "jira", True, _penalty_score(points, caps["open_defect_points"]),
                  w["open_defects"], {"open": len(open_t), "by_priority": by_prio, "severity_points": points},
                  f"{len(open_t)} open defect(s) worth {points:g} severity points (0 at "
                  f"{caps['open_defect_points']:g})"),
        Component("defect_age", "jira", True, _penalty_score(median_age, caps["defect_age_days"]),
                  w["defect_age"], round(median_age, 1),
                  f"median open defect age {median_age:.0f} days (0 at {caps['defect_age_days']:g})"
                  if ages else "no open defects"),
        Component("reopen_rate", "jira", True, _penalty_score(rate, caps["reopen_rate"]), w["reopen_rate"],
                  round(rate, 3), f"{reopened} of {len(tickets)} defect(s) reopened in the last "
                                  f"{rules.lookback_days:g} days (0 at {caps['reopen_rate']:.0%})"),
        Component("escalations", "jira", True, _penalty_score(escalated, caps["escalations"]), w["escalations"],
                  escalated, f"{escalated} escalated open defect(s) (0 at {caps['escalations']:g})"),
    ]
    if not salesforce_configured:
        why = "Salesforce not configured"
        comps += [Component(n, "salesforce", False, None, w[n], None, why)
                  for n in ("open_cases", "escalated_cases", "renewal")]
    elif account is None:
        why = f"no Salesforce account has client key {client!r}"
        comps += [Component(n, "salesforce", False, None, w[n], None, why)
                  for n in ("open_cases", "escalated_cases", "renewal")]
    else:
        open_cases = [c for c in (cases or []) if not c.closed]
        esc = sum(1 for c in open_cases if c.escalated)
        comps.append(Component("open_cases", "salesforce", True, _penalty_score(len(open_cases), caps["open_cases"]),
                               w["open_cases"], len(open_cases),
                               f"{len(open_cases)} open case(s) (0 at {caps['open_cases']:g})"))
        comps.append(Component("escalated_cases", "salesforce", True, _penalty_score(esc, caps["escalated_cases"]),
                               w["escalated_cases"], esc,
                               f"{esc} escalated open case(s) (0 at {caps['escalated_cases']:g})"))
        if account.renewal_date is None:
            comps.append(Component("renewal", "salesforce", False, None, w["renewal"], None,
                                   "no renewal date on the account"))
        else:
            days = (account.renewal_date - now.date()).days
            horizon = caps["renewal_horizon_days"]
            score = round(100.0 * min(1.0, max(0.0, days) / horizon), 1)
            comps.append(Component("renewal", "salesforce", True, score, w["renewal"],
                                   account.renewal_date.isoformat(),
                                   f"renewal on {account.renewal_date.isoformat()} in {days} days "
                                   f"(full marks beyond {horizon:g})"))
    comps.append(_documentation(rules, now, account, doc, confluence_configured))
    avail = [c for c in comps if c.available and c.weight > 0]
    total_w = sum(c.weight for c in avail)
    score = round(sum(c.weight * (c.score or 0.0) for c in avail) / total_w, 1) if total_w else 100.0
    return ClientHealth(client, account.name if account else client, score, tuple(comps),
                        facts={"tickets": len(tickets), "open_defects": len(open_t)})


def _documentation(rules: HealthRules, now: datetime, account: Account | None, doc: DocState | None,
                   confluence_configured: bool) -> Component:
    w = rules.weights["documentation"]
    if account is None or not account.config_page_id:
        return Component("documentation", "confluence", False, None, w, None,
                         "no configuration page recorded for this client")
    if not confluence_configured:
        return Component("documentation", "confluence", False, None, w, None, "Confluence not configured")
    if doc is not None and doc.missing:
        return Component("documentation", "confluence", True, 0.0, w, {"page_id": account.config_page_id},
                         f"configuration page {account.config_page_id} does not exist: documentation missing")
    if doc is None or doc.last_edited is None:
        return Component("documentation", "confluence", False, None, w, None,
                         f"page {account.config_page_id} has no version date")
    edited = doc.last_edited
    age = days_between(edited, now)
    value = {"page_id": doc.page_id, "title": doc.title, "last_edited": edited.isoformat(),
             "config_changed": account.config_changed.isoformat() if account.config_changed else None}
    if account.config_changed and edited < account.config_changed:
        return Component("documentation", "confluence", True, 0.0, w, value,
                         f"'{doc.title}' last edited {edited.date()} but the configuration changed "
                         f"{account.config_changed.date()}: out of date")
    if age > rules.doc_max_age_days:
        return Component("documentation", "confluence", True, 0.0, w, value,
                         f"'{doc.title}' last edited {age:.0f} days ago (limit {rules.doc_max_age_days:g}): "
                         "out of date")
    return Component("documentation", "confluence", True, 100.0, w, value,
                     f"'{doc.title}' edited {edited.date()}, after the last configuration change: up to date")


def health_scores(tickets: Sequence[Ticket], rules: HealthRules, now: datetime, *,
                  accounts: Sequence[Account] = (), cases: Sequence[Case] = (),
                  docs: Mapping[str, DocState] | None = None, salesforce_configured: bool = False,
                  confluence_configured: bool = False, clients: Iterable[str] | None = None) -> list[ClientHealth]:
    """Health of every client seen in Jira or Salesforce (or only `clients`), worst first."""
    docs = docs or {}
    by_client: dict[str, list[Ticket]] = {}
    for t in tickets:
        for c in t.clients:
            by_client.setdefault(c, []).append(t)
    acct_by_client = {a.client: a for a in accounts}
    cases_by_acct: dict[str, list[Case]] = {}
    for case in cases:
        cases_by_acct.setdefault(case.account_id, []).append(case)
    names = sorted(set(clients) if clients is not None else set(by_client) | set(acct_by_client))
    out = []
    for name in names:
        acct = acct_by_client.get(name)
        out.append(client_health(
            name, by_client.get(name, []), rules, now, account=acct,
            cases=cases_by_acct.get(acct.account_id, []) if acct else None,
            doc=docs.get(acct.config_page_id) if acct and acct.config_page_id else None,
            salesforce_configured=salesforce_configured, confluence_configured=confluence_configured))
    out.sort(key=lambda h: (h.score, h.client))
    return out


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
