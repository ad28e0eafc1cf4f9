"""HTTP API of the duplicate flow (n8n/workflows/dedupe-jira-webhook.json): verify and claim Jira deliveries,
build guardrails proposals from a stored duplicate check, record runs that guardrails refused."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import request
from marshmallow import ValidationError

from shared.api import Api
from shared.db import transaction
from shared.errors import Conflict, MetisError, NotFound
from shared.jira_webhooks import (SIGNATURE_HEADER, WebhookRejected, delivery_id, issue_external_id,
                                  parse_jira_webhook)
from shared.web import ctx

from . import intake
from . import intake_repository as repo
from .intake_schemas import (IntakeQuery, IntakeRead, IntakeRecordRead, ProposalsCreate, ProposalsRead,
                             RefusalCreate, RefusalRead)
from .schemas import TicketCreate

log = logging.getLogger(__name__)

api = Api("dedupe_intake", __name__)

CALLERS = ("n8n", "ops")


@dataclass(frozen=True)
class IntakeEngine:
    """Built once at start-up (app.py)."""

    config: intake.IntakeConfig
    webhook_secret: str | None
    claim_lease_seconds: int = 900


def _engine() -> IntakeEngine:
    return ctx().state["intake"]  # type: ignore[no-any-return]


class IntakeProblem(MetisError):
    status, code, title = 400, "intake_rejected", "Delivery rejected"


@api.route("/v1/intake/jira-webhook", methods=["POST"], response=IntakeRead, callers=CALLERS)
def intake_webhook() -> dict[str, Any]:
    """A Jira webhook forwarded byte for byte: verify its signature, keep defects only, claim the issue once."""
    eng = _engine()
    raw = request.get_data(cache=True)
    delivery = delivery_id(request.headers)
    event: str | None = None
    issue: dict[str, Any] | None = None
    try:
        event, issue = parse_jira_webhook(raw, request.headers.get(SIGNATURE_HEADER), eng.webhook_secret,
                                          events=intake.EVENTS, purpose="checked for duplicates")
        ignored = intake.ignored_because(issue, eng.config)
        ticket = intake.ticket_from_issue(issue)
        if ignored is None:
            try:
                TicketCreate().load(ticket)
            except ValidationError as exc:
                raise WebhookRejected(400, "invalid_ticket", f"the issue cannot be checked: {exc.messages}"[:500]) \
                    from exc
    except WebhookRejected as exc:
        key = issue["key"] if issue else None
        with transaction(ctx().pool) as conn:
            repo.record_intake(conn, outcome="rejected", delivery_id=delivery, event=event, issue_key=key,
                               reason=exc.code, detail=exc.detail[:2000])
        log.warning("jira webhook rejected: %s (delivery %s)", exc.code, delivery)
        raise IntakeProblem(exc.detail, code=exc.code, status=exc.status) from exc
    key = issue["key"]
    issue_id = str(issue["id"]) if issue.get("id") is not None else None
    answer: dict[str, Any] = {"issue_key": key, "delivery_id": delivery, "external_id": None,
                              "idempotency_key": None, "ticket": None, "limit": None, "reason": None}
    if ignored is not None:
        with transaction(ctx().pool) as conn:
            repo.record_intake(conn, outcome="ignored", delivery_id=delivery, event=event, issue_key=key,
                               issue_id=issue_id, reason="not_checked", detail=ignored)
        return {**answer, "outcome": "ignored", "reason": ignored}
    with transaction(ctx().pool) as conn:
        won = repo.claim_issue(conn, issue_key=key, issue_id=issue_id, delivery_id=delivery,
                               lease_seconds=eng.claim_lease_seconds)
        repo.record_intake(conn, outcome="accepted" if won else "duplicate", delivery_id=delivery, event=event,
                           issue_key=key, issue_id=issue_id)
    if not won:
        return {**answer, "outcome": "duplicate", "reason": "this issue was already accepted for a duplicate check"}
    external = issue_external_id(issue)
    return {**answer, "outcome": "accepted", "external_id": external, "idempotency_key": delivery or external,
            "ticket": ticket, "limit": eng.config.search_limit}


@api.route("/v1/intake/proposals", methods=["POST"], body=ProposalsCreate, response=ProposalsRead, callers=CALLERS)
def proposals(body: dict[str, Any]) -> dict[str, Any]:
    """Guardrails proposals built by code from the duplicate check stored under idempotency_key; completes the claim."""
    key, check = body["issue_key"], body["idempotency_key"]
    with transaction(ctx().pool) as conn:
        stored = repo.stored_check(conn, check)
        if stored is None:
            raise NotFound(f"no duplicate check is stored under {check!r} (POST /v1/duplicates with that "
                           "idempotency_key first)", code="unknown_check")
        ticket_key, answer = stored
        if ticket_key != key:
            raise Conflict(f"the check stored under {check!r} is for {ticket_key!r}, not {key!r}",
                           code="check_mismatch")
        built = intake.build_proposals(run_id=str(body["run_id"]), issue_key=key, answer=answer,
                                       cfg=_engine().config)
        repo.complete_claim(conn, issue_key=key, run_id=str(body["run_id"]), verdict=str(answer.get("verdict")))
    return {"issue_key": key, "verdict": answer.get("verdict"), "confidence": answer.get("confidence"),
            "mode": answer.get("mode"), "duplicate_of": intake.duplicate_of(answer),
            "candidates": [c.get("key") for c in answer.get("candidates") or []], "proposals": built}


@api.route("/v1/intake/refused", methods=["POST"], body=RefusalCreate, response=RefusalRead, callers=CALLERS)
def refused(body: dict[str, Any]) -> dict[str, Any]:
    """Guardrails refused (or could not open) the run of an accepted issue: record why, give up the claim."""
    status, code, key = body["status"], body["code"], body["issue_key"]
    detail = (f"guardrails answered {status}: {body['detail'] or code}" if status
              else f"guardrails did not answer: {body['detail'] or code}")[:2000]
    with transaction(ctx().pool) as conn:
        released = repo.release_claim(conn, issue_key=key)
        repo.record_intake(conn, outcome="refused", delivery_id=body["delivery_id"], event="run_refused",
                           issue_key=key, reason=code, detail=detail)
    log.warning("duplicate check of %s not started: %s", key, detail[:300])
    return {"outcome": "refused", "issue_key": key, "reason": code, "detail": detail, "released": released}


@api.route("/v1/intake", methods=["GET"], query=IntakeQuery, response=IntakeRecordRead, many=True, callers=CALLERS)
def intake_list(query: dict[str, Any]) -> list[dict[str, Any]]:
    """Recent deliveries with their outcome (accepted, duplicate, ignored, rejected, refused) and why."""
    with ctx().pool.connection() as conn:
        return repo.list_intake(conn, outcome=query["outcome"], issue_key=query["issue_key"], limit=query["limit"])
