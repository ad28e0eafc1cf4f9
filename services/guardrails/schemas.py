"""marshmallow schemas of the guardrails API (XCreate / XRead naming)."""
from __future__ import annotations

from marshmallow import Schema, fields, validate

_NAME = validate.Regexp(r"^[a-z0-9][a-z0-9._-]{0,63}$", error="lower-case letters, digits, . _ - (max 64)")


class RunCreate(Schema):
    task = fields.String(required=True, validate=_NAME)
    trigger = fields.String(required=True, validate=validate.OneOf(("event", "schedule", "manual")))
    workflow = fields.String(load_default="", validate=validate.Length(max=200))
    external_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=200))


class RunFinish(Schema):
    status = fields.String(required=True, validate=validate.OneOf(("succeeded", "failed", "cancelled")))
    outcome = fields.Dict(load_default=dict)


class BudgetRead(Schema):
    limit_micros = fields.Integer()
    spent_micros = fields.Integer()
    reserved_micros = fields.Integer()
    remaining_micros = fields.Integer()
    limit_usd = fields.Float()
    spent_usd = fields.Float()
    limit_tokens = fields.Integer()
    spent_tokens = fields.Integer()
    reserved_tokens = fields.Integer()


class RunRead(Schema):
    id = fields.String()
    task = fields.String()
    trigger = fields.String()
    workflow = fields.String()
    external_id = fields.String(allow_none=True)
    caller = fields.String()
    status = fields.String()
    outcome = fields.Dict()
    opened_at = fields.DateTime()
    finished_at = fields.DateTime(allow_none=True)
    budget = fields.Nested(BudgetRead)
    created = fields.Boolean()


class RunQuery(Schema):
    task = fields.String(load_default=None)
    status = fields.String(load_default=None, validate=validate.OneOf(
        ("open", "succeeded", "failed", "cancelled", "denied")))
    trigger = fields.String(load_default=None, validate=validate.OneOf(("event", "schedule", "manual")))
    since = fields.AwareDateTime(load_default=None)
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


class KillSwitchChange(Schema):
    actor = fields.String(required=True, validate=validate.Length(min=1, max=200))
    reason = fields.String(required=True, validate=validate.Length(min=1, max=2000))


class KillSwitchRead(Schema):
    engaged = fields.Boolean()
    actor = fields.String(allow_none=True)
    reason = fields.String(allow_none=True)
    changed_at = fields.DateTime(allow_none=True)
    changed = fields.Boolean()


class AuditQuery(Schema):
    run_id = fields.UUID(load_default=None)
    task = fields.String(load_default=None)
    kind = fields.String(load_default=None, validate=validate.Length(max=100))
    since = fields.AwareDateTime(load_default=None)
    until = fields.AwareDateTime(load_default=None)
    after_seq = fields.Integer(load_default=None, validate=validate.Range(min=0))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    format = fields.String(load_default="json", validate=validate.OneOf(("json", "ndjson")))


class AuditRead(Schema):
    seq = fields.Integer()
    at = fields.String()
    kind = fields.String()
    actor = fields.String()
    run_id = fields.String(allow_none=True)
    task = fields.String(allow_none=True)
    subject = fields.String()
    data = fields.Dict()
    prev_hash = fields.String()
    hash = fields.String()


class AuditVerifyRead(Schema):
    ok = fields.Boolean()
    checked = fields.Integer()
    head_seq = fields.Integer(allow_none=True)
    first_broken_seq = fields.Integer(allow_none=True)
    problem = fields.String(allow_none=True)


class HeartbeatRead(Schema):
    name = fields.String()
    interval_seconds = fields.Integer()
    grace_seconds = fields.Integer()
    last_at = fields.DateTime(allow_none=True)
    age_seconds = fields.Float(allow_none=True)
    status = fields.String()
    overdue_since = fields.DateTime(allow_none=True)
    beats = fields.Integer()
    recovered = fields.Boolean()


class CapRead(Schema):
    key = fields.String()
    scope = fields.String()
    task = fields.String(allow_none=True)
    period = fields.String()
    limit_micros = fields.Integer()
    spent_micros = fields.Integer()
    reserved_micros = fields.Integer()
    remaining_micros = fields.Integer()


class BudgetsRead(Schema):
    caps = fields.List(fields.Nested(CapRead))
    open_reservations = fields.Integer()
    open_reserved_micros = fields.Integer()


class AlertRead(Schema):
    id = fields.Integer()
    dedupe_key = fields.String()
    kind = fields.String()
    severity = fields.String()
    payload = fields.Dict()
    created_at = fields.DateTime()
    attempts = fields.Integer()
    delivered_at = fields.DateTime(allow_none=True)
    last_error = fields.String(allow_none=True)


class AlertQuery(Schema):
    pending = fields.Boolean(load_default=False)
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


class PolicyReloadRead(Schema):
    changed = fields.Boolean()
    version = fields.Integer()
    digest = fields.String()
    changes = fields.List(fields.String())


class PolicyRead(Schema):
    digest = fields.String()
    tasks = fields.Dict()
    limits = fields.Dict()
    heartbeats = fields.Dict()
    actions = fields.Dict()
