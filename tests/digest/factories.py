"""Factories for Jira REST v3 issue payloads and tickets, as /rest/api/3/search/jql returns them."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from services.digest.config import load_config
from services.digest.tickets import Ticket, ticket_from_issue

NOW = datetime(2025, 6, 2, 7, 0, tzinfo=timezone.utc)
CONFIG = load_config("config")
CATEGORY = {"To Do": "new", "In Progress": "indeterminate", "Waiting for Customer": "indeterminate",
            "Done": "done"}


def ts(days_ago: float) -> str:
    """A Jira timestamp `days_ago` before NOW."""
    dt = NOW - timedelta(days=days_ago)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000+0000")


def issue(key: str, *, summary: str = "Payslip PDF is blank", priority: str | None = "Medium",
          status: str = "To Do", created: float = 10, updated: float | None = None, client: str | None = "acme",
          labels: list[str] | None = None, flagged: bool = False, reopens: int | None = None,
          blocked_by: list[tuple[str, str]] | None = None, duplicated_by: list[str] | None = None,
          description: str = "", resolved: float | None = None, components: list[str] | None = None,
          assignee: str | None = None, status_since: float | None = None) -> dict[str, Any]:
    """One issue; `created`/`updated`/`resolved` are days before NOW; blocked_by is [(key, status)]."""
    links: list[dict[str, Any]] = []
    for other, st in blocked_by or []:
        links.append({"id": str(len(links) + 1), "type": {"name": "Blocks", "inward": "is blocked by",
                                                          "outward": "blocks"},
                      "inwardIssue": {"key": other, "fields": {"status": {
                          "name": st, "statusCategory": {"key": CATEGORY.get(st, "indeterminate")}}}}})
    for other in duplicated_by or []:
        links.append({"id": str(len(links) + 1), "type": {"name": "Duplicate", "inward": "is duplicated by",
                                                          "outward": "duplicates"},
                      "inwardIssue": {"key": other, "fields": {"status": {"name": "Done"}}}})
    fields: dict[str, Any] = {
        "summary": summary,
        "description": {"type": "doc", "version": 1, "content": [
            {"type": "paragraph", "content": [{"type": "text", "text": description}]}]} if description else None,
        "status": {"name": status, "statusCategory": {"key": CATEGORY.get(status, "indeterminate")}},
        "priority": {"name": priority} if priority else None,
        "issuetype": {"name": "Bug"},
        "project": {"key": key.split("-")[0]},
        "created": ts(created),
        "updated": ts(created if updated is None else updated),
        "resolutiondate": ts(resolved) if resolved is not None else None,
        "labels": labels or [],
        "components": [{"name": c} for c in components or []],
        "issuelinks": links,
        "assignee": {"displayName": assignee} if assignee else None,
        "customfield_10100": {"value": client} if client else None,
        "customfield_10021": [{"value": "Impediment"}] if flagged else None,
        "customfield_10102": reopens,
    }
    if status_since is not None:
        fields["statuscategorychangedate"] = ts(status_since)
    return {"id": str(abs(hash(key)) % 100000), "key": key, "fields": fields}


def ticket(key: str, **kwargs: Any) -> Ticket:
    """A normalised Ticket built through the same path the service uses."""
    return ticket_from_issue(issue(key, **kwargs), CONFIG.jira)
