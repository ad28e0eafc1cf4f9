"""Bulk back-fill from Jira: page through a JQL search and index every issue; resumable from a cursor in PostgreSQL."""
from __future__ import annotations

import logging
from typing import Any, Callable

from shared.connectors.adf import adf_to_text
from shared.connectors.jira import JiraClient
from shared.db import transaction

from . import repository
from .service import Engine, TicketIn, upsert_tickets

log = logging.getLogger(__name__)

FIELDS = ["summary", "description", "created", "updated", "status", "resolution", "priority", "components",
          "labels", "project"]


def issue_to_ticket(issue: dict[str, Any], client_field: str | None = None) -> dict[str, Any]:
    """A Jira REST v3 issue → the dedupe ticket shape (names instead of objects, ADF → text)."""
    f = issue.get("fields") or {}

    def name(v: Any) -> str | None:
        return v.get("name") if isinstance(v, dict) else (v if isinstance(v, str) else None)

    client = f.get(client_field) if client_field else None
    if isinstance(client, dict):
        client = client.get("value") or client.get("name")
    return {"key": issue["key"], "summary": f.get("summary") or "(no summary)",
            "description": adf_to_text(f.get("description")), "created": f.get("created"),
            "updated": f.get("updated"), "status": name(f.get("status")), "resolution": name(f.get("resolution")),
            "priority": name(f.get("priority")), "components": [name(c) for c in f.get("components") or [] if name(c)],
            "labels": list(f.get("labels") or []), "project": (f.get("project") or {}).get("key"),
            "client": client if isinstance(client, str) else None}


def backfill(*, engine: Engine, jira: JiraClient, jql: str, name: str, page_size: int = 100,
             restart: bool = False, client_field: str | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Index every issue the JQL finds; the cursor is saved after each stored page, so a rerun resumes there.

    Pages come through the shared Jira client (`POST /rest/api/3/search/jql`, nextPageToken paging), which
    retries 429 / 5xx waiting what Retry-After asks — what a bulk read of Jira Cloud meets — and raises
    `ConnectorError` when Jira keeps failing or refuses (401, 400): the pages stored so far stay stored.
    """
    from .schemas import TicketCreate

    schema = TicketCreate()
    with transaction(engine.pool) as conn:
        if restart:
            repository.reset_cursor(conn, name)
        cur = repository.get_cursor(conn, name)
    if cur and cur["jql"] != jql:
        raise ValueError(f"cursor {name!r} belongs to another JQL ({cur['jql']!r}); use --restart or another --name")
    if cur and cur["done"]:
        return {"pages": 0, "tickets": 0, "resumed": True, "done": True, "total": int(cur["tickets"])}
    token = cur["next_page_token"] if cur else None
    pages = total = 0
    fields = FIELDS + ([client_field] if client_field else [])
    while True:
        data = jira.search_page(jql, fields=fields, max_results=page_size, next_page_token=token)
        issues = data.get("issues") or []
        tickets = [TicketIn.from_dict(schema.load(issue_to_ticket(i, client_field)),
                                      engine.config.description_chars_stored) for i in issues]
        nxt = data.get("nextPageToken")
        done = bool(data.get("isLast", not nxt)) or not nxt
        if tickets:
            upsert_tickets(engine=engine, tickets=tickets)
        # The cursor moves only after the page is stored: a crash re-reads at most one page (idempotent).
        with transaction(engine.pool) as conn:
            repository.save_cursor(conn, name=name, jql=jql, next_page_token=None if done else nxt, done=done,
                                   added=len(tickets))
        pages += 1
        total += len(tickets)
        if progress:
            progress(len(tickets))
        if done:
            return {"pages": pages, "tickets": total, "resumed": cur is not None, "done": True}
        token = nxt


