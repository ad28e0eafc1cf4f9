"""Marshmallow schemas of the triage API (XCreate for input, XRead for output)."""
from __future__ import annotations

import uuid
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates

from .service import JIRA_KEY


class TextOrAdf(fields.Field):  # type: ignore[type-arg]
    """A description given as plain text (webhooks carry wiki-markup strings) or as an ADF document (REST v3)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, dict) and value.get("type") == "doc":
            return value
        raise ValidationError("must be a string or an ADF document ({\"type\": \"doc\", ...})")


class TicketCreate(Schema):
    """The triggering ticket."""

    key = fields.String(required=True, validate=validate.Regexp(JIRA_KEY, error="must be a Jira issue key like PAY-123"))
    summary = fields.String(required=True, validate=validate.Length(max=10_000))
    description = TextOrAdf(load_default=None, allow_none=True)
    issue_type = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=100))
    project = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=100))
    priority = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=100))
    components = fields.List(fields.String(validate=validate.Length(max=255)), load_default=list,
                             validate=validate.Length(max=50))
    labels = fields.List(fields.String(validate=validate.Length(max=255)), load_default=list,
                         validate=validate.Length(max=100))
    created = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=64))


class TriageCreate(Schema):
    """`POST /v1/triage` body."""

    ticket = fields.Nested(TicketCreate, required=True)
    run_id = fields.String(required=True)
    mode = fields.String(load_default="auto", validate=validate.OneOf(["auto", "offline"]))
    submit = fields.Boolean(load_default=True, metadata={
        "description": "send the proposals / escalation to guardrails (false: return them only, store nothing)"})

    @validates("run_id")
    def _run_id(self, value: str, **_: Any) -> None:
        try:
            uuid.UUID(value)
        except ValueError as exc:
            raise ValidationError("must be the UUID of a guardrails run (POST /v1/runs)") from exc


class VoteRead(Schema):
    value = fields.String(allow_none=True)
    confidence = fields.Float()


class EvidenceVoteRead(Schema):
    category = fields.Nested(VoteRead)
    priority = fields.Nested(VoteRead)
    component = fields.Nested(VoteRead)
    confidence = fields.Float()


class ReferenceRead(Schema):
    key = fields.String()
    kind = fields.String(metadata={"description": "ticket, kb or duplicate"})
    score = fields.Float()
    summary = fields.String()
    url = fields.String(allow_none=True)


class ReasonRead(Schema):
    code = fields.String()
    detail = fields.String()


class ProposalRead(Schema):
    run_id = fields.String()
    connector = fields.String()
    operation = fields.String()
    target = fields.String()
    payload = fields.Dict()
    idempotency_key = fields.String()
    reason = fields.String()


class CostRead(Schema):
    usd = fields.Float()
    llm_calls = fields.Integer()
    input_tokens = fields.Integer()
    output_tokens = fields.Integer()
    cache_creation_input_tokens = fields.Integer()
    cache_read_input_tokens = fields.Integer()


class TriageRead(Schema):
    """`POST /v1/triage` answer."""

    ticket_key = fields.String()
    run_id = fields.String()
    mode = fields.String(metadata={"description": "llm or offline: which mode produced the answer"})
    model = fields.String(allow_none=True)
    fallback_reason = fields.String(allow_none=True)
    category = fields.String()
    priority = fields.String(allow_none=True)
    component = fields.String(allow_none=True)
    confidences = fields.Dict(keys=fields.String(), values=fields.Float())
    confidence = fields.Float()
    suggested_resolution = fields.String(metadata={"description": "markdown"})
    references = fields.List(fields.Nested(ReferenceRead))
    evidence_vote = fields.Nested(EvidenceVoteRead)
    duplicates = fields.Dict(allow_none=True)
    needs_human = fields.Boolean()
    reasons = fields.List(fields.Nested(ReasonRead))
    proposals = fields.List(fields.Nested(ProposalRead))
    escalation = fields.Dict(allow_none=True)
    truncation = fields.Dict()
    notes = fields.List(fields.String())
    cost = fields.Nested(CostRead)
    llm_attempts = fields.Integer()
    submission = fields.Dict(allow_none=True, metadata={"description": "guardrails' answers (null when submit=false)"})
    replayed = fields.Boolean(metadata={"description": "true when this run had already triaged the ticket"})


class PollCreate(Schema):
    """`POST /v1/intake/poll` body: issues from a JQL search (REST v3 shape)."""

    issues = fields.List(fields.Dict(), required=True, validate=validate.Length(max=500))


class JiraPollCreate(Schema):
    """`POST /v1/intake/jira-poll` body: optional JQL / limit overrides of config/triage.yaml's polling."""

    jql = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=2000))
    max_issues = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(1, 1000))
    trigger = fields.String(load_default="manual", validate=validate.OneOf(["schedule", "manual"]), metadata={
        "description": "schedule: only polls when polling is enabled for this site; manual: always"})


class IntakeRead(Schema):
    outcome = fields.String(metadata={"description": "accepted, duplicate or rejected"})
    issue_key = fields.String(allow_none=True)
    external_id = fields.String(allow_none=True, metadata={"description": "use as the run's external_id"})
    ticket = fields.Dict(allow_none=True)
    reason = fields.String(allow_none=True)


class PollRead(Schema):
    accepted = fields.List(fields.Nested(IntakeRead))
    duplicates = fields.List(fields.String())
    rejected = fields.List(fields.Nested(IntakeRead))
    skipped = fields.String(allow_none=True, metadata={"description": "why a scheduled poll did nothing"})


class IntakeRefusalCreate(Schema):
    """`POST /v1/intake/refused` body: guardrails would not open the run for a ticket just accepted."""

    issue_key = fields.String(required=True,
                              validate=validate.Regexp(JIRA_KEY, error="must be a Jira issue key like PAY-123"))
    source = fields.String(required=True, validate=validate.OneOf(["webhook", "poll"]))
    external_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=200))
    status = fields.Integer(load_default=0, validate=validate.Range(0, 599), metadata={
        "description": "guardrails' HTTP status; 0 when it did not answer"})
    code = fields.String(required=True, validate=validate.Length(min=1, max=100), metadata={
        "description": "guardrails' problem code, e.g. kill_switch_engaged, daily_cap_exhausted"})
    detail = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=2000))


class IntakeRefusalRead(Schema):
    outcome = fields.String(metadata={"description": "refused"})
    issue_key = fields.String()
    reason = fields.String(metadata={"description": "guardrails' code"})
    detail = fields.String(allow_none=True)
    released = fields.Boolean(metadata={"description": "the ticket's claim was given up: a later delivery or poll "
                                                       "may triage it"})
    retry = fields.Boolean(metadata={"description": "true when guardrails was unavailable (5xx / no answer): "
                                                    "worth delivering again later; false for a refusal"})


class IntakeQuery(Schema):
    outcome = fields.String(load_default=None,
                            validate=validate.OneOf(["accepted", "duplicate", "rejected", "refused"]))
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 500))


class IntakeRecordRead(Schema):
    id = fields.Integer()
    source = fields.String()
    delivery_id = fields.String(allow_none=True)
    event = fields.String(allow_none=True)
    issue_key = fields.String(allow_none=True)
    issue_id = fields.String(allow_none=True)
    outcome = fields.String()
    reason = fields.String(allow_none=True)
    detail = fields.String(allow_none=True)
    received_at = fields.DateTime()
