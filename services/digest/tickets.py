"""Jira issues → the small, typed Ticket every digest job works on (ticket text stays untrusted data)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from shared.connectors.adf import adf_to_text

from .config import JiraConfig

DONE_STATUS_NAMES = frozenset({"done", "closed", "resolved", "fixed", "cancelled", "canceled", "won't do"})
MAX_TEXT = 4000  # descriptions are only ever excerpted; keep memory flat over 10,000+ tickets


def parse_time(value: Any) -> datetime | None:
    """Jira timestamps ('2023-06-24T19:24:50.000+0000') and ISO dates to aware datetimes (UTC if naive)."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class LinkedIssue:
    key: str
    done: bool


@dataclass(frozen=True)
class Ticket:
    """One Jira issue, normalised; `clients` are the customers it affects."""

    key: str
    summary: str
    description: str
    status: str
    status_category: str          # new | indeterminate | done
    priority: str | None
    issue_type: str | None
    project: str | None
    created: datetime
    updated: datetime
    resolved: datetime | None
    status_since: datetime
    labels: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    assignee: str | None = None
    flagged: bool = False
    reopen_count: int = 0
    escalated: bool = False
    blocked_by: tuple[LinkedIssue, ...] = ()
    duplicated_by: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_open(self) -> bool:
        return self.status_category != "done"

    @property
    def open_blockers(self) -> tuple[str, ...]:
        return tuple(b.key for b in self.blocked_by if not b.done)


def _name(value: Any) -> str | None:
    if isinstance(value, dict):
        for k in ("value", "name", "displayName", "key"):
            if isinstance(value.get(k), str) and value[k].strip():
                return str(value[k]).strip()
        return None
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _names(value: Any) -> list[str]:
    """A string, option, organisation, or a list of them → their display values."""
    if isinstance(value, list):
        return [n for n in (_name(v) for v in value) if n]
    n = _name(value)
    return [n] if n else []


def _status_done(status: Any) -> tuple[str, bool]:
    if not isinstance(status, dict):
        return "", False
    name = str(status.get("name") or "")
    cat = (status.get("statusCategory") or {}).get("key")
    if cat:
        return name, cat == "done"
    return name, name.strip().lower() in DONE_STATUS_NAMES


def _link_matches(link_type: dict[str, Any], wanted: str) -> bool:
    wanted_l = wanted.lower()
    return any(str(link_type.get(k) or "").lower() == wanted_l for k in ("name",))


def ticket_from_issue(issue: dict[str, Any], cfg: JiraConfig) -> Ticket:
    """Normalise one issue from /rest/api/3/search/jql (fields as requested by JiraConfig.fields())."""
    f = issue.get("fields") or {}
    key = str(issue.get("key") or "")
    if not key:
        raise ValueError("Jira issue without a key")
    status_name, status_done = _status_done(f.get("status"))
    cat = ((f.get("status") or {}).get("statusCategory") or {}).get("key")
    status_category = str(cat) if cat else ("done" if status_done else "indeterminate")
    created = parse_time(f.get("created")) or datetime.now(timezone.utc)
    updated = parse_time(f.get("updated")) or created
    since = parse_time(f.get(cfg.status_since_field)) if cfg.status_since_field else None
    labels = tuple(str(lb) for lb in (f.get("labels") or []) if isinstance(lb, str))
    clients: list[str] = []
    if cfg.client_field:
        clients.extend(_names(f.get(cfg.client_field)))
    if cfg.client_label_prefix:
        p = cfg.client_label_prefix
        clients.extend(lb[len(p):] for lb in labels if lb.startswith(p) and len(lb) > len(p))
    flagged = bool(_names(f.get(cfg.flagged_field))) if cfg.flagged_field else False
    reopen = 0
    if cfg.reopen_count_field:
        raw = f.get(cfg.reopen_count_field)
        try:
            reopen = max(0, int(float(raw))) if raw is not None and not isinstance(raw, bool) else 0
        except (TypeError, ValueError):
            reopen = 0
    blocked_by: list[LinkedIssue] = []
    duplicated_by: list[str] = []
    for link in f.get("issuelinks") or []:
        if not isinstance(link, dict):
            continue
        ltype = link.get("type") or {}
        inward = link.get("inwardIssue")
        # An entry carrying `inwardIssue` X reads "this issue <type.inward> X" (e.g. "is blocked by X").
        if not isinstance(inward, dict) or not inward.get("key"):
            continue
        if _link_matches(ltype, cfg.blocks_link_type):
            _, done = _status_done((inward.get("fields") or {}).get("status"))
            blocked_by.append(LinkedIssue(str(inward["key"]), done))
        elif _link_matches(ltype, cfg.duplicate_link_type):
            duplicated_by.append(str(inward["key"]))
    escalation = {lb.lower() for lb in cfg.escalation_labels}
    return Ticket(
        key=key,
        summary=str(f.get("summary") or "")[:500],
        description=adf_to_text(f.get("description"))[:MAX_TEXT],
        status=status_name,
        status_category=status_category,
        priority=_name(f.get("priority")),
        issue_type=_name(f.get("issuetype")),
        # The project is the key's prefix; asking Jira for the project object would only add bytes.
        project=key.rsplit("-", 1)[0],
        created=created,
        updated=updated,
        resolved=parse_time(f.get("resolutiondate")),
        status_since=since or updated,
        labels=labels,
        components=tuple(_names(f.get("components"))),
        clients=tuple(dict.fromkeys(clients)),
        assignee=_name(f.get("assignee")),
        flagged=flagged,
        reopen_count=reopen,
        escalated=bool(escalation & {lb.lower() for lb in labels}),
        blocked_by=tuple(blocked_by),
        duplicated_by=tuple(dict.fromkeys(duplicated_by)),
    )


def tickets_from_issues(issues: Iterable[dict[str, Any]], cfg: JiraConfig) -> list[Ticket]:
    """Normalise a stream of issues, keeping the last copy of a key seen twice (pages can overlap)."""
    out: dict[str, Ticket] = {}
    for issue in issues:
        t = ticket_from_issue(issue, cfg)
        out[t.key] = t
    return list(out.values())
