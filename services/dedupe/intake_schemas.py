"""Request and response schemas of the duplicate flow's intake endpoints (OpenAPI is generated from these)."""
from __future__ import annotations

from marshmallow import Schema, fields, validate

from shared.jira_webhooks import JIRA_KEY

ISSUE_KEY = validate.Regexp(JIRA_KEY, error="must be a Jira issue key like PAY-123")
OUTCOMES = ("accepted", "duplicate", "ignored", "rejected", "refused")


class IntakeRead(Schema):
    """`POST /v1/intake/jira-webhook` answer (2xx: accepted, duplicate or ignored; rejections are problem+json)."""

    outcome = fields.String(metadata={"enum": ["accepted", "duplicate", "ignored"]})
    issue_key = fields.String(allow_none=True)
    delivery_id = fields.String(allow_none=True)
    external_id = fields.String(allow_none=True, metadata={"description": "use as the run's external_id"})
    idempotency_key = fields.String(allow_none=True, metadata={
        "description": "use for POST /v1/duplicates: the delivery id (jira-issue:<id> when Jira sent none)"})
    ticket = fields.Dict(allow_none=True, metadata={"description": "the ticket for POST /v1/duplicates"})
    limit = fields.Integer(allow_none=True, metadata={"description": "candidates to ask for"})
    reason = fields.String(allow_none=True)


class ProposalsCreate(Schema):
    """`POST /v1/intake/proposals`: build the proposals from the check stored under idempotency_key."""

    run_id = fields.UUID(required=True)
    issue_key = fields.String(required=True, validate=ISSUE_KEY)
    idempotency_key = fields.String(required=True, validate=validate.Length(min=1, max=200))


class ProposalsRead(Schema):
    issue_key = fields.String()
    verdict = fields.String(metadata={"enum": ["duplicate", "possible", "none"]})
    confidence = fields.Float()
    mode = fields.String()
    duplicate_of = fields.String(allow_none=True)
    candidates = fields.List(fields.String(), metadata={"description": "candidate keys, best first"})
    proposals = fields.List(fields.Dict(), metadata={"description": "POST /v1/actions bodies for guardrails"})


class RefusalCreate(Schema):
    """`POST /v1/intake/refused`: guardrails refused (or could not open) the run of an accepted issue."""

    issue_key = fields.String(required=True, validate=ISSUE_KEY)
    delivery_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=200))
    status = fields.Integer(load_default=0, validate=validate.Range(0, 599), metadata={
        "description": "guardrails' HTTP status; 0 when it did not answer"})
    code = fields.String(required=True, validate=validate.Length(min=1, max=100), metadata={
        "description": "guardrails' problem code, e.g. task_daily_cap_exhausted, kill_switch_engaged"})
    detail = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=2000))


class RefusalRead(Schema):
    outcome = fields.String()
    issue_key = fields.String()
    reason = fields.String()
    detail = fields.String()
    released = fields.Boolean(metadata={"description": "the claim was given up: a later delivery may check it"})


class IntakeQuery(Schema):
    outcome = fields.String(load_default=None, validate=validate.OneOf(OUTCOMES))
    issue_key = fields.String(load_default=None, validate=ISSUE_KEY)
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))


class IntakeRecordRead(Schema):
    id = fields.Integer()
    delivery_id = fields.String(allow_none=True)
    event = fields.String(allow_none=True)
    issue_key = fields.String(allow_none=True)
    issue_id = fields.String(allow_none=True)
    outcome = fields.String()
    reason = fields.String(allow_none=True)
    detail = fields.String(allow_none=True)
    received_at = fields.DateTime()
