"""Jira webhook deliveries as n8n forwards them byte for byte: signature first, then the event and the issue.

Used by every service that takes Jira webhooks (triage, dedupe). Nothing is parsed from a body whose
`X-Hub-Signature` does not match; each refusal carries an HTTP status and a stable code for the intake record.
"""
from __future__ import annotations

import json
import re
from typing import Any, Collection, Mapping, Protocol

from .signatures import verify_jira_signature

JIRA_KEY = re.compile(r"^[A-Z][A-Z0-9_]{0,30}-[1-9][0-9]{0,9}$")
DELIVERY_HEADER = "X-Atlassian-Webhook-Identifier"
SIGNATURE_HEADER = "X-Hub-Signature"


class WebhookRejected(Exception):
    """A delivery that must not be processed: recorded, answered with a 4xx (5xx: our configuration), nothing runs."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class _Headers(Protocol):
    def get(self, key: str) -> str | None: ...


def delivery_id(headers: _Headers) -> str | None:
    """Jira's delivery identifier (the same across retries and redeliveries), capped; None when absent."""
    return (headers.get(DELIVERY_HEADER) or "").strip()[:200] or None


def parse_jira_webhook(body: bytes, signature: str | None, secret: str | None, *, events: Collection[str],
                       purpose: str = "processed") -> tuple[str, dict[str, Any]]:
    """Verify the signature of the raw body, then return (event, issue); raise WebhookRejected otherwise."""
    if not secret:
        raise WebhookRejected(503, "webhook_secret_missing", "the Jira webhook secret is not configured")
    if not verify_jira_signature(secret, body, signature):
        raise WebhookRejected(401, "invalid_signature", "X-Hub-Signature is missing or does not match the body")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookRejected(400, "malformed_body", f"the body is not JSON: {exc}"[:200]) from exc
    if not isinstance(doc, dict):
        raise WebhookRejected(400, "malformed_body", "the body must be a JSON object")
    event = doc.get("webhookEvent")
    if not isinstance(event, str) or not event:
        raise WebhookRejected(400, "missing_event", "webhookEvent is missing")
    if event not in events:
        raise WebhookRejected(422, "unknown_event", f"event {event[:60]!r} is not {purpose} "
                                                    f"(accepted: {', '.join(sorted(events))})")
    issue = doc.get("issue")
    if not isinstance(issue, dict) or not isinstance(issue.get("key"), str) or not isinstance(issue.get("fields"), dict):
        raise WebhookRejected(400, "missing_issue", "issue (with key and fields) is missing")
    if not JIRA_KEY.match(issue["key"]):
        raise WebhookRejected(400, "missing_issue", "issue.key is not a Jira issue key")
    return event, issue


def issue_external_id(issue: Mapping[str, Any]) -> str:
    """One id per Jira issue (its numeric id, else its key): redeliveries and polling twins share it."""
    return f"jira-issue:{issue.get('id') or issue.get('key')}"
