"""HTTP API of the triage service: parse with marshmallow, call the service, dump the result."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import request

from shared.api import Api
from shared.connectors.http import ConnectorError
from shared.connectors.jira import JiraClient
from shared.db import transaction
from shared.errors import MetisError, Unavailable
from shared.web import ctx

from . import repository as repo
from . import service
from .clients import DedupeClient, GuardrailsClient, GuardrailsError
from .schemas import (IntakeQuery, IntakeRead, IntakeRecordRead, IntakeRefusalCreate, IntakeRefusalRead,
                      JiraPollCreate, PollCreate, PollRead, TriageCreate, TriageRead)

log = logging.getLogger(__name__)

api = Api("triage", __name__)

CALLERS = ("n8n", "ops")


@dataclass
class TriageEngine:
    """Service objects built once at start-up (see app.py)."""

    deps: service.TriageDeps
    guardrails: GuardrailsClient
    dedupe: DedupeClient
    webhook_secret: str | None
    claim_lease_seconds: int
    jira: JiraClient | None = None
    polling_enabled: bool = False


def engine() -> TriageEngine:
    return ctx().state["triage"]  # type: ignore[no-any-return]


class IntakeProblem(MetisError):
    status, code, title = 400, "intake_rejected", "Delivery rejected"


@api.route("/v1/triage", methods=["POST"], body=TriageCreate, response=TriageRead, callers=CALLERS)
def triage(body: dict[str, Any]) -> dict[str, Any]:
    """Triage one ticket: category, priority, component, suggested resolution, confidence; propose or escalate."""
    eng = engine()
    pool = ctx().pool
    run_id = body["run_id"]
    ticket = service.normalize_ticket(body["ticket"], eng.deps.cfg)
    if body["submit"]:
        with pool.connection() as conn:
            stored = repo.get_result(conn, run_id=run_id, ticket_key=ticket.key)
        if stored is not None:
            # A retry of the same run (n8n retry, concurrent twin): never pay for the model twice.
            return _finish_submission(run_id, ticket.key, stored, replayed=True)
    outcome = service.triage(ticket=ticket, run_id=run_id, deps=eng.deps, mode=body["mode"])
    response = service.outcome_as_dict(outcome)
    if not body["submit"]:
        return {**response, "submission": None, "replayed": False}
    with transaction(pool) as conn:
        inserted = repo.insert_result(conn, run_id=run_id, ticket_key=ticket.key, mode=outcome.mode,
                                      needs_human=outcome.needs_human, confidence=outcome.result.confidence,
                                      cost_usd=outcome.usage.cost_usd, response=response)
    with pool.connection() as conn:
        stored = repo.get_result(conn, run_id=run_id, ticket_key=ticket.key)
    assert stored is not None
    return _finish_submission(run_id, ticket.key, stored, replayed=not inserted)


def _finish_submission(run_id: str, ticket_key: str, stored: dict[str, Any], *, replayed: bool) -> dict[str, Any]:
    response = dict(stored["response"])
    submission = stored.get("submission")
    if submission is None:
        try:
            # Refusals for good are recorded per proposal inside; only a transient failure arrives here.
            submission = service.submit(response, engine().guardrails)
        except GuardrailsError as exc:
            raise Unavailable(f"guardrails did not take the proposals: {exc}; retry the call "
                              "(the stored triage is reused, the model is not called again)",
                              code="guardrails_unavailable") from exc
        with transaction(ctx().pool) as conn:
            repo.set_submission(conn, run_id=run_id, ticket_key=ticket_key, submission=submission)
            repo.complete_claim(conn, issue_key=ticket_key, run_id=run_id)
    return {**response, "submission": submission, "replayed": replayed}


@api.route("/v1/intake/jira-webhook", methods=["POST"], response=IntakeRead, callers=CALLERS)
def intake_webhook() -> dict[str, Any]:
    """A Jira webhook delivery, forwarded byte for byte: verify its signature, then claim the ticket once."""
    eng = engine()
    raw = request.get_data(cache=True)
    delivery = (request.headers.get("X-Atlassian-Webhook-Identifier") or "")[:200] or None
    try:
        event, issue = service.parse_webhook(raw, request.headers.get("X-Hub-Signature"), eng.webhook_secret)
    except service.IntakeRejected as exc:
        with transaction(ctx().pool) as conn:
            repo.record_intake(conn, source="webhook", outcome="rejected", delivery_id=delivery, reason=exc.code)
        log.warning("jira webhook rejected: %s (delivery %s)", exc.code, delivery)
        raise IntakeProblem(exc.detail, code=exc.code, status=exc.status) from exc
    return _claim("webhook", issue, delivery=delivery, event=event)


POLL_FIELDS = ("summary", "description", "issuetype", "project", "priority", "components", "labels", "created")


@api.route("/v1/intake/jira-poll", methods=["POST"], body=JiraPollCreate, response=PollRead, callers=CALLERS)
def intake_jira_poll(body: dict[str, Any]) -> dict[str, Any]:
    """The polling twin: JQL for recently created tickets (read-only), each accepted once like a webhook."""
    eng = engine()
    if body["trigger"] == "schedule" and not eng.polling_enabled:
        return {"accepted": [], "duplicates": [], "rejected": [], "skipped": "polling is disabled for this site"}
    if eng.jira is None:
        raise Unavailable("Jira polling is not configured (METIS_JIRA_URL, METIS_JIRA_EMAIL, METIS_JIRA_API_TOKEN)",
                          code="jira_not_configured")
    cfg = eng.deps.cfg
    limit = body["max_issues"] or cfg.poll_max_issues
    issues: list[dict[str, Any]] = []
    try:
        for issue, _ in eng.jira.search(body["jql"] or cfg.poll_jql, fields=POLL_FIELDS, page_size=min(100, limit)):
            issues.append(issue)
            if len(issues) >= limit:
                break
    except ConnectorError as exc:
        if exc.status == 400:
            raise MetisError(f"Jira rejected the JQL: {exc}", code="invalid_jql", status=400) from exc
        raise Unavailable(f"Jira search failed: {exc}", code="jira_unavailable") from exc
    return _accept_issues(issues)


@api.route("/v1/intake/poll", methods=["POST"], body=PollCreate, response=PollRead, callers=CALLERS)
def intake_poll(body: dict[str, Any]) -> dict[str, Any]:
    """Issues found by a JQL search elsewhere: each is accepted once, whoever (webhook or poll) saw it first."""
    return _accept_issues(body["issues"])


def _accept_issues(issues: list[dict[str, Any]]) -> dict[str, Any]:
    accepted: list[dict[str, Any]] = []
    duplicates: list[str] = []
    rejected: list[dict[str, Any]] = []
    for issue in issues:
        key = issue.get("key")
        if not isinstance(key, str) or not service.JIRA_KEY.match(key) or not isinstance(issue.get("fields"), dict):
            with transaction(ctx().pool) as conn:
                repo.record_intake(conn, source="poll", outcome="rejected", reason="missing_issue",
                                   issue_key=key if isinstance(key, str) else None)
            rejected.append({"outcome": "rejected", "issue_key": key if isinstance(key, str) else None,
                             "reason": "missing_issue", "external_id": None, "ticket": None})
            continue
        answer = _claim("poll", issue, delivery=None, event="poll")
        if answer["outcome"] == "accepted":
            accepted.append(answer)
        else:
            duplicates.append(key)
    return {"accepted": accepted, "duplicates": duplicates, "rejected": rejected, "skipped": None}


def _claim(source: str, issue: dict[str, Any], *, delivery: str | None, event: str) -> dict[str, Any]:
    eng = engine()
    key = issue["key"]
    issue_id = str(issue.get("id")) if issue.get("id") is not None else None
    with transaction(ctx().pool) as conn:
        won = repo.claim_ticket(conn, issue_key=key, issue_id=issue_id, source=source, delivery_id=delivery,
                                lease_seconds=eng.claim_lease_seconds)
        outcome = "accepted" if won else "duplicate"
        repo.record_intake(conn, source=source, outcome=outcome, delivery_id=delivery, event=event,
                           issue_key=key, issue_id=issue_id)
    if not won:
        return {"outcome": "duplicate", "issue_key": key, "external_id": service.external_id(issue),
                "ticket": None, "reason": "this ticket was already accepted for triage"}
    return {"outcome": "accepted", "issue_key": key, "external_id": service.external_id(issue),
            "ticket": service.ticket_from_jira_issue(issue), "reason": None}


@api.route("/v1/intake/refused", methods=["POST"], body=IntakeRefusalCreate, response=IntakeRefusalRead,
           callers=CALLERS)
def intake_refused(body: dict[str, Any]) -> dict[str, Any]:
    """Guardrails refused (or could not open) the run of a ticket just accepted: record why, give up the claim."""
    status, code, key = body["status"], body["code"], body["issue_key"]
    detail = f"guardrails answered {status}: {body['detail'] or code}" if status else \
        f"guardrails did not answer: {body['detail'] or code}"
    with transaction(ctx().pool) as conn:
        released = repo.release_claim(conn, issue_key=key)
        repo.record_intake(conn, source=body["source"], outcome="refused", event="run_refused", issue_key=key,
                           reason=code, detail=detail[:2000])
    log.warning("triage of %s not started: %s", key, detail[:300])
    return {"outcome": "refused", "issue_key": key, "reason": code, "detail": detail, "released": released,
            "retry": status == 0 or status >= 500}


@api.route("/v1/intake", methods=["GET"], query=IntakeQuery, response=IntakeRecordRead, many=True, callers=CALLERS)
def intake_list(query: dict[str, Any]) -> list[dict[str, Any]]:
    """Recent deliveries with their outcome (accepted, duplicate, rejected and why)."""
    with ctx().pool.connection() as conn:
        return repo.list_intake(conn, outcome=query["outcome"], limit=query["limit"])
