"""Request and response schemas of the dedupe API (OpenAPI is generated from these)."""
from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, pre_load, validate, validates_schema

from shared.connectors.adf import adf_to_text, is_adf

KEY = validate.Length(min=1, max=255)


class _Text(fields.String):
    """A string, or an Atlassian Document Format document (what Jira REST v3 returns) flattened to text."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if is_adf(value):
            value = adf_to_text(value)
        return super()._deserialize(value, attr, data, **kwargs)


class TicketCreate(Schema):
    """A ticket as indexed: Jira fields flattened (names, not objects)."""

    key = fields.String(required=True, validate=KEY)
    summary = fields.String(required=True, validate=validate.Length(min=1))
    description = _Text(load_default="", allow_none=True)
    created = fields.AwareDateTime(load_default=None, allow_none=True, default_timezone=None)
    updated = fields.AwareDateTime(load_default=None, allow_none=True, default_timezone=None)
    status = fields.String(load_default=None, allow_none=True)
    resolution = fields.String(load_default=None, allow_none=True)
    resolution_text = _Text(load_default=None, allow_none=True)
    priority = fields.String(load_default=None, allow_none=True)
    components = fields.List(fields.String(), load_default=list)
    labels = fields.List(fields.String(), load_default=list)
    project = fields.String(load_default=None, allow_none=True)
    client = fields.String(load_default=None, allow_none=True)

    @pre_load
    def _naive_as_utc(self, data: Any, **_: Any) -> Any:
        # Jira sends offsets; a CSV import may not. Naive times are taken as UTC rather than refused.
        if isinstance(data, dict):
            data = dict(data)
            for k in ("created", "updated"):
                v = data.get(k)
                if isinstance(v, str) and len(v) >= 19 and not any(c in v[10:] for c in "Z+-"):
                    data[k] = v + "+00:00"
        return data

    @validates_schema
    def _summary_not_blank(self, data: dict[str, Any], **_: Any) -> None:
        if not str(data.get("summary", "")).strip():
            raise ValidationError("must not be blank", "summary")


class QueryTicket(TicketCreate):
    """The ticket to search for; it need not be indexed, so its key is optional."""

    key = fields.String(load_default=None, allow_none=True, validate=KEY)


class TicketBatchCreate(Schema):
    tickets = fields.List(fields.Nested(TicketCreate), required=True, validate=validate.Length(min=1, max=1000))


class TicketBatchRead(Schema):
    received = fields.Integer(required=True)
    indexed = fields.Integer(required=True)
    embedded = fields.Integer(required=True)
    unchanged = fields.Integer(required=True)


class FiltersSchema(Schema):
    """Search filters; an unknown filter name is refused (400), never ignored."""

    project = fields.List(fields.String(validate=KEY), validate=validate.Length(min=1))
    status = fields.List(fields.String(validate=KEY), validate=validate.Length(min=1))
    client = fields.List(fields.String(validate=KEY), validate=validate.Length(min=1))
    created_after = fields.AwareDateTime()
    created_before = fields.AwareDateTime()
    exclude_keys = fields.List(fields.String(validate=KEY))

    @pre_load
    def _scalars_to_lists(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict):
            data = {k: [v] if k in ("project", "status", "client") and isinstance(v, str) else v
                    for k, v in data.items()}
        return data


class DuplicateQuery(Schema):
    ticket = fields.Nested(QueryTicket, required=True)
    limit = fields.Integer(load_default=10, validate=validate.Range(min=1, max=100))
    created_before = fields.AwareDateTime(load_default=None, allow_none=True)
    filters = fields.Nested(FiltersSchema, load_default=dict)
    idempotency_key = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=200))
    run_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=100))
    index = fields.Boolean(load_default=False)  # also upsert the ticket (needs its key)

    @pre_load
    def _naive_as_utc(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("created_before"), str):
            v = data["created_before"]
            if len(v) >= 19 and not any(c in v[10:] for c in "Z+-"):
                data = {**data, "created_before": v + "+00:00"}
        return data

    @validates_schema
    def _index_needs_key(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("index") and not data["ticket"].get("key"):
            raise ValidationError("a key is required when index is true", "ticket")


class SimilarQuery(Schema):
    ticket = fields.Nested(QueryTicket, required=True)
    limit = fields.Integer(load_default=5, validate=validate.Range(min=1, max=50))
    filters = fields.Nested(FiltersSchema, load_default=dict)


class CandidateRead(Schema):
    key = fields.String(required=True)
    score = fields.Float(required=True)
    confidence = fields.Float(required=True)
    summary = fields.String(required=True)
    status = fields.String(allow_none=True)
    resolution = fields.String(allow_none=True)
    project = fields.String(allow_none=True)
    created = fields.String(allow_none=True)
    reasons = fields.List(fields.String(), required=True)


class SimilarCandidateRead(CandidateRead):
    resolution_text = fields.String(allow_none=True)
    priority = fields.String(allow_none=True)
    components = fields.List(fields.String())
    labels = fields.List(fields.String())
    client = fields.String(allow_none=True)


class LlmRead(Schema):
    duplicate_of = fields.String(allow_none=True)
    confidence = fields.Float()
    rationale = fields.String()


class DuplicateRead(Schema):
    verdict = fields.String(required=True, metadata={"enum": ["duplicate", "possible", "none"]})
    confidence = fields.Float(required=True)
    features = fields.Dict(keys=fields.String(), values=fields.Float(), required=True,
                           metadata={"description": "the verdict model's inputs for the best candidate"})
    mode = fields.String(required=True, metadata={"enum": ["offline", "llm"]})
    mode_detail = fields.String(required=True)
    candidates = fields.List(fields.Nested(CandidateRead), required=True)
    searched = fields.Integer(required=True)
    llm = fields.Nested(LlmRead, allow_none=True)
    indexed = fields.Boolean()
    replayed = fields.Boolean()


class SimilarRead(Schema):
    candidates = fields.List(fields.Nested(SimilarCandidateRead), required=True)
    searched = fields.Integer(required=True)


class IndexStatsRead(Schema):
    tickets = fields.Integer(required=True)
    rev = fields.Integer(required=True)
    embedder = fields.String(required=True)
    stale_embedder = fields.Integer(required=True)
