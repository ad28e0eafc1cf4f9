"""marshmallow schemas of the digest API (XCreate for requests, XRead for responses)."""
from __future__ import annotations

from datetime import timezone

from marshmallow import RAISE, Schema, fields, validate

_RUN_ID = validate.Regexp(r"^[A-Za-z0-9._:-]{1,128}$", error="run_id must be 1-128 of A-Z a-z 0-9 . _ : -")


class _JobCreate(Schema):
    class Meta:
        unknown = RAISE

    run_id = fields.String(allow_none=True, load_default=None, validate=_RUN_ID,
                           metadata={"description": "guardrails run id; the same run never produces two digests"})
    now = fields.AwareDateTime(default_timezone=timezone.utc, allow_none=True, load_default=None,
                               metadata={"description": "evaluate as of this time (default: now)"})
    jql = fields.String(allow_none=True, load_default=None, validate=validate.Length(min=1, max=4000),
                        metadata={"description": "JQL replacing the configured one (n8n workflow parameter)"})
    rules = fields.Dict(keys=fields.String(), load_default=dict,
                        metadata={"description": "overrides of this job's section of config/digest.yaml"})
    narrative = fields.String(load_default="offline", validate=validate.OneOf(["auto", "offline"]),
                              metadata={"description": "auto: the cheap model through the gateway when the run "
                                                       "has budget, else the offline template"})


class MonitorCreate(_JobCreate):
    """Daily defect monitoring."""


class WeeklyCreate(_JobCreate):
    """The weekly digest; narrative defaults to auto."""

    narrative = fields.String(load_default="auto", validate=validate.OneOf(["auto", "offline"]))
    limit = fields.Integer(allow_none=True, load_default=None, validate=validate.Range(min=1, max=40))


class PatternsCreate(_JobCreate):
    """Weekly cross-client pattern detection."""


class HealthCreate(_JobCreate):
    """Daily client health; optionally only some clients."""

    clients = fields.List(fields.String(validate=validate.Length(min=1, max=200)), allow_none=True,
                          load_default=None, validate=validate.Length(min=1, max=1000))


class NarrativeRead(Schema):
    text = fields.String()
    mode = fields.String(metadata={"description": "llm | offline"})
    reason = fields.String()
    model = fields.String(allow_none=True)
    note = fields.String()


class EmailRead(Schema):
    subject = fields.String()
    html = fields.String()
    text = fields.String()


class DigestRead(Schema):
    id = fields.UUID()
    kind = fields.String()
    run_id = fields.String(allow_none=True)
    created_at = fields.DateTime()
    as_of = fields.DateTime()
    complete = fields.Boolean(metadata={"description": "always true: incomplete jobs fail and archive nothing"})
    params = fields.Dict()
    summary = fields.Dict()
    data = fields.Dict()
    narrative = fields.Nested(NarrativeRead)
    slack = fields.Dict(metadata={"description": "Block Kit message for a Slack incoming webhook"})
    email = fields.Nested(EmailRead)
    markdown = fields.String()


class DigestSummaryRead(Schema):
    id = fields.UUID()
    kind = fields.String()
    run_id = fields.String(allow_none=True)
    created_at = fields.DateTime()
    as_of = fields.DateTime()
    summary = fields.Dict()
    narrative_mode = fields.String()
    narrative_reason = fields.String()
    email_subject = fields.String()


class DigestListRead(Schema):
    digests = fields.List(fields.Nested(DigestSummaryRead))


class DigestListQuery(Schema):
    class Meta:
        unknown = RAISE

    kind = fields.String(load_default=None, validate=validate.OneOf(["monitor", "weekly", "patterns", "health"]))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=200))
    before = fields.AwareDateTime(default_timezone=timezone.utc, load_default=None)


class HealthPointRead(Schema):
    as_of = fields.DateTime()
    score = fields.Float()
    digest_id = fields.UUID()


class ClientHealthRead(Schema):
    client = fields.String()
    name = fields.String()
    score = fields.Float()
    as_of = fields.DateTime()
    previous_score = fields.Float(allow_none=True)
    delta = fields.Float(allow_none=True)
    components = fields.List(fields.Dict())
    history = fields.List(fields.Nested(HealthPointRead))


class HealthListRead(Schema):
    clients = fields.List(fields.Nested(ClientHealthRead))


class HealthQuery(Schema):
    class Meta:
        unknown = RAISE

    client = fields.String(load_default=None, validate=validate.Length(min=1, max=200))
    history = fields.Integer(load_default=10, validate=validate.Range(min=1, max=365))
