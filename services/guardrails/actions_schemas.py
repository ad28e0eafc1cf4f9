"""marshmallow schemas of the actions, approvals and escalations API (XCreate / XRead naming)."""
from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates

_IDENT = validate.Regexp(r"^[a-z][a-z0-9_]{0,31}$", error="lower-case letters, digits and _ (max 32)")
STATUSES = ("denied", "pending_approval", "approved", "executing", "executed", "failed", "rejected", "expired")


def _not_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("must not be blank")


class ActionCreate(Schema):
    run_id = fields.UUID(required=True)
    connector = fields.String(required=True, validate=_IDENT)
    operation = fields.String(required=True, validate=_IDENT)
    target = fields.String(required=True, validate=validate.Length(min=1, max=200))
    payload = fields.Dict(required=True)
    idempotency_key = fields.String(required=True, validate=[validate.Length(min=1, max=200), _not_blank])
    reason = fields.String(load_default="", validate=validate.Length(max=2000))
    # A proposer may ask for a shorter approval window than the policy's (never a longer one).
    expires_in_seconds = fields.Integer(load_default=None, allow_none=True, strict=True,
                                        validate=validate.Range(min=1, max=30 * 86400))


class SummaryRead(Schema):
    title = fields.String()
    where = fields.String()
    url = fields.String(allow_none=True)
    preview = fields.String()
    proposed_by = fields.String()


class ActionRead(Schema):
    id = fields.String()
    approval_id = fields.String(allow_none=True)
    run_id = fields.String()
    task = fields.String()
    caller = fields.String()
    action = fields.String()
    connector = fields.String()
    operation = fields.String()
    target = fields.String()
    payload = fields.Raw()
    reason = fields.String()
    idempotency_key = fields.String()
    rule = fields.String()
    mode = fields.String()
    policy_reason = fields.String()
    status = fields.String()
    waiting = fields.String()
    expires_at = fields.String(allow_none=True)
    decision = fields.String(allow_none=True)
    approver = fields.String(allow_none=True)
    decision_channel = fields.String(allow_none=True)
    decision_comment = fields.String(allow_none=True)
    decided_at = fields.String(allow_none=True)
    attempts = fields.Integer()
    result = fields.Raw(allow_none=True)
    last_error = fields.String(allow_none=True)
    error_retryable = fields.Boolean(allow_none=True)
    outcome_unknown = fields.Boolean()
    executed_at = fields.String(allow_none=True)
    created_at = fields.String()
    updated_at = fields.String()
    summary = fields.Nested(SummaryRead)
    history = fields.List(fields.Dict())
    approval_requests = fields.List(fields.Dict())
    created = fields.Boolean()
    changed = fields.Boolean()


class ActionQuery(Schema):
    status = fields.String(load_default=None)
    connector = fields.String(load_default=None)
    operation = fields.String(load_default=None)
    target = fields.String(load_default=None)
    run_id = fields.UUID(load_default=None)
    task = fields.String(load_default=None)
    rule = fields.String(load_default=None)
    since = fields.AwareDateTime(load_default=None)
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))

    @validates("status")
    def _statuses(self, value: str | None, **_: Any) -> None:
        bad = [s for s in (value or "").split(",") if s and s not in STATUSES]
        if bad:
            raise ValidationError(f"unknown status {', '.join(bad)}; one or more of {', '.join(STATUSES)}")


class ActionDecision(Schema):
    decision = fields.String(required=True, validate=validate.OneOf(("approve", "reject")))
    approver = fields.String(required=True, validate=[validate.Length(min=1, max=200), _not_blank])
    channel = fields.String(load_default="api", validate=validate.Length(min=1, max=50))
    comment = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=2000))


class ActionExpire(Schema):
    actor = fields.String(load_default="n8n", validate=validate.Length(min=1, max=200))


class ActionRetry(Schema):
    actor = fields.String(required=True, validate=[validate.Length(min=1, max=200), _not_blank])
    reason = fields.String(required=True, validate=[validate.Length(min=1, max=2000), _not_blank])
    # Resend a write whose outcome is unknown and cannot be looked up (a Slack message): only after checking.
    force = fields.Boolean(load_default=False)


class ApprovalRequestCreate(Schema):
    execution_id = fields.String(required=True, validate=validate.Length(min=1, max=64))
    channels = fields.List(fields.String(validate=validate.Length(min=1, max=30)), load_default=list,
                           validate=validate.Length(max=10))


class EscalationCreate(Schema):
    run_id = fields.UUID(required=True)
    reason = fields.String(required=True, validate=[validate.Length(min=1, max=4000), _not_blank])
    subject = fields.String(required=True, validate=[validate.Length(min=1, max=200), _not_blank])
    context = fields.Dict(load_default=dict)


class EscalationResolve(Schema):
    actor = fields.String(required=True, validate=[validate.Length(min=1, max=200), _not_blank])
    resolution = fields.String(load_default="resolved", validate=validate.OneOf(("resolved", "dismissed")))
    comment = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=2000))


class EscalationRead(Schema):
    id = fields.String()
    run_id = fields.String()
    task = fields.String()
    caller = fields.String()
    raised_by = fields.String()
    subject = fields.String()
    reason = fields.String()
    context = fields.Dict()
    status = fields.String()
    resolution = fields.String(allow_none=True)
    resolved_by = fields.String(allow_none=True)
    comment = fields.String(allow_none=True)
    created_at = fields.String()
    resolved_at = fields.String(allow_none=True)
    created = fields.Boolean()


class EscalationQuery(Schema):
    status = fields.String(load_default=None, validate=validate.OneOf(("open", "resolved")))
    task = fields.String(load_default=None)
    subject = fields.String(load_default=None)
    run_id = fields.UUID(load_default=None)
    since = fields.AwareDateTime(load_default=None)
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
