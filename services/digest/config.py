"""config/digest.yaml: rules, JQL, score weights — validated, with per-request overrides from n8n."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

CONFIG_FILE = "digest.yaml"


class ConfigError(RuntimeError):
    """The digest configuration is invalid; the message lists every problem by path."""


def _flatten(messages: Any, prefix: str = "") -> list[str]:
    if isinstance(messages, dict):
        out: list[str] = []
        for k, v in messages.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{prefix}: {m}" for m in messages]
    if isinstance(messages, list):
        return [line for m in messages for line in _flatten(m, prefix)]
    return [f"{prefix}: {messages}"]


def describe_errors(err: ValidationError) -> list[str]:
    """Every validation error as 'path.to.field: message'."""
    return _flatten(err.messages)


_pos = validate.Range(min=0, min_inclusive=False)
_nonneg = validate.Range(min=0)
_points = fields.Dict(keys=fields.String(validate=validate.Length(min=1)), values=fields.Float(validate=_nonneg))


class _Strict(Schema):
    class Meta:
        unknown = RAISE


@dataclass(frozen=True)
class JiraConfig:
    browse_url: str | None
    client_field: str | None
    client_label_prefix: str | None
    flagged_field: str | None
    reopen_count_field: str | None
    status_since_field: str | None
    escalation_labels: tuple[str, ...]
    blocks_link_type: str
    duplicate_link_type: str
    page_size: int

    def fields(self, *, description: bool = False) -> list[str]:
        """The Jira fields a job needs (custom fields only when configured). Descriptions are the bulk of a
        search response, so only pattern detection, which embeds them, asks for them."""
        base = ["summary", "status", "priority", "created", "updated", "resolutiondate",
                "labels", "components", "issuelinks", "assignee"]
        if description:
            base.append("description")
        extra = [self.client_field, self.flagged_field, self.reopen_count_field, self.status_since_field]
        return base + [f for f in extra if f and f not in base]


class JiraSchema(_Strict):
    browse_url = fields.String(allow_none=True, load_default=None)
    client_field = fields.String(allow_none=True, load_default=None)
    client_label_prefix = fields.String(allow_none=True, load_default=None)
    flagged_field = fields.String(allow_none=True, load_default=None)
    reopen_count_field = fields.String(allow_none=True, load_default=None)
    status_since_field = fields.String(allow_none=True, load_default="statuscategorychangedate")
    escalation_labels = fields.List(fields.String(), load_default=list)
    blocks_link_type = fields.String(load_default="Blocks")
    duplicate_link_type = fields.String(load_default="Duplicate")
    page_size = fields.Integer(load_default=100, validate=validate.Range(min=1, max=5000))

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> JiraConfig:
        data["escalation_labels"] = tuple(data["escalation_labels"])
        return JiraConfig(**data)


@dataclass(frozen=True)
class MonitorRules:
    jql: str
    stale_days: Mapping[str, float]
    stale_days_default: float
    blocker_priorities: tuple[str, ...]
    waiting_statuses: tuple[str, ...]
    waiting_days: float
    show: int

    def stale_limit(self, priority: str | None) -> float:
        """Days without update after which a ticket of this priority is stale."""
        return float(self.stale_days.get(priority or "", self.stale_days_default))


class MonitorSchema(_Strict):
    jql = fields.String(required=True, validate=validate.Length(min=1, max=4000))
    stale_days = fields.Dict(keys=fields.String(), values=fields.Float(validate=_pos), required=True)
    stale_days_default = fields.Float(load_default=14, validate=_pos)
    blocker_priorities = fields.List(fields.String(), load_default=list)
    waiting_statuses = fields.List(fields.String(), load_default=list)
    waiting_days = fields.Float(load_default=5, validate=_pos)
    show = fields.Integer(load_default=25, validate=validate.Range(min=1, max=40))

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> MonitorRules:
        data["blocker_priorities"] = tuple(data["blocker_priorities"])
        data["waiting_statuses"] = tuple(data["waiting_statuses"])
        return MonitorRules(**data)


SCORE_PARTS = ("priority", "age", "staleness", "clients", "duplicates", "reopenings", "customer_value")
SCORE_CAPS = ("age_days", "stale_days", "clients", "duplicates", "reopenings")


@dataclass(frozen=True)
class WeeklyRules:
    jql: str
    limit: int
    weights: Mapping[str, float]
    caps: Mapping[str, float]
    priority_points: Mapping[str, float]
    priority_points_default: float


def _exact_keys(expected: tuple[str, ...]) -> validate.Validator:
    def check(value: Mapping[str, Any]) -> None:
        missing = [k for k in expected if k not in value]
        unknown = [k for k in value if k not in expected]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown {', '.join(unknown)} (expected {', '.join(expected)})")
            raise ValidationError("; ".join(parts))
    return check  # type: ignore[return-value]


class WeeklySchema(_Strict):
    jql = fields.String(required=True, validate=validate.Length(min=1, max=4000))
    limit = fields.Integer(load_default=10, validate=validate.Range(min=1, max=40))
    weights = fields.Dict(keys=fields.String(), values=fields.Float(validate=_nonneg), required=True,
                          validate=_exact_keys(SCORE_PARTS))
    caps = fields.Dict(keys=fields.String(), values=fields.Float(validate=_pos), required=True,
                       validate=_exact_keys(SCORE_CAPS))
    priority_points = fields.Dict(keys=fields.String(), values=fields.Float(validate=validate.Range(min=0, max=1)),
                                  required=True)
    priority_points_default = fields.Float(load_default=0.4, validate=validate.Range(min=0, max=1))

    @validates_schema
    def _weights_sum(self, data: dict[str, Any], **_: Any) -> None:
        total = sum(data.get("weights", {}).values())
        if abs(total - 100) > 1e-6:
            raise ValidationError(f"weights must add up to 100 (they add up to {total:g})", "weights")

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> WeeklyRules:
        return WeeklyRules(**data)


@dataclass(frozen=True)
class NarrativeConfig:
    model: str
    max_tokens: int
    timeout_seconds: float


class NarrativeSchema(_Strict):
    model = fields.String(required=True)
    max_tokens = fields.Integer(load_default=700, validate=validate.Range(min=50, max=4000))
    timeout_seconds = fields.Float(load_default=60, validate=_pos)

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> NarrativeConfig:
        return NarrativeConfig(**data)


@dataclass(frozen=True)
class PatternRules:
    jql: str
    window_days: float
    similarity: float
    min_clients: int
    min_tickets: int
    description_chars: int
    show: int


class PatternSchema(_Strict):
    jql = fields.String(required=True, validate=validate.Length(min=1, max=4000))
    window_days = fields.Float(load_default=7, validate=validate.Range(min=1, max=366))
    similarity = fields.Float(load_default=0.72, validate=validate.Range(min=0.3, max=0.99))
    min_clients = fields.Integer(load_default=2, validate=validate.Range(min=1))
    min_tickets = fields.Integer(load_default=3, validate=validate.Range(min=2))
    description_chars = fields.Integer(load_default=300, validate=validate.Range(min=0, max=5000))
    show = fields.Integer(load_default=10, validate=validate.Range(min=1, max=40))

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> PatternRules:
        return PatternRules(**data)


HEALTH_COMPONENTS = ("open_defects", "defect_age", "reopen_rate", "escalations",
                     "open_cases", "escalated_cases", "renewal", "documentation")
HEALTH_CAPS = ("open_defect_points", "defect_age_days", "reopen_rate", "escalations",
               "open_cases", "escalated_cases", "renewal_horizon_days")


@dataclass(frozen=True)
class HealthRules:
    jql: str
    lookback_days: float
    weights: Mapping[str, float]
    severity_points: Mapping[str, float]
    severity_points_default: float
    caps: Mapping[str, float]
    doc_max_age_days: float


class HealthSchema(_Strict):
    jql = fields.String(required=True, validate=validate.Length(min=1, max=4000))
    lookback_days = fields.Float(load_default=90, validate=_pos)
    weights = fields.Dict(keys=fields.String(), values=fields.Float(validate=_nonneg), required=True,
                          validate=_exact_keys(HEALTH_COMPONENTS))
    severity_points = _points
    severity_points_default = fields.Float(load_default=1, validate=_nonneg)
    caps = fields.Dict(keys=fields.String(), values=fields.Float(validate=_pos), required=True,
                       validate=_exact_keys(HEALTH_CAPS))
    doc_max_age_days = fields.Float(load_default=365, validate=_pos)

    @validates_schema
    def _weights_sum(self, data: dict[str, Any], **_: Any) -> None:
        total = sum(data.get("weights", {}).values())
        if abs(total - 100) > 1e-6:
            raise ValidationError(f"weights must add up to 100 (they add up to {total:g})", "weights")

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> HealthRules:
        return HealthRules(**data)


SF_FIELDS = ("client_key", "name", "value", "renewal_date", "config_page_id", "config_changed")


@dataclass(frozen=True)
class SalesforceConfig:
    accounts_soql: str
    cases_soql: str
    fields: Mapping[str, str]


class SalesforceSchema(_Strict):
    accounts_soql = fields.String(required=True, validate=validate.Length(min=1))
    cases_soql = fields.String(required=True, validate=validate.Length(min=1))
    # "fields" would shadow Schema.fields, hence the attribute name.
    field_map = fields.Dict(keys=fields.String(validate=validate.OneOf(SF_FIELDS)), values=fields.String(),
                            required=True, data_key="fields")

    @validates_schema
    def _client_key(self, data: dict[str, Any], **_: Any) -> None:
        if "client_key" not in data.get("field_map", {}):
            raise ValidationError("client_key is required (the Account field holding the Jira client)",
                                  "fields")

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> SalesforceConfig:
        return SalesforceConfig(accounts_soql=data["accounts_soql"], cases_soql=data["cases_soql"],
                                fields=data["field_map"])


@dataclass(frozen=True)
class DigestConfig:
    jira: JiraConfig
    monitor: MonitorRules
    weekly: WeeklyRules
    narrative: NarrativeConfig
    patterns: PatternRules
    health: HealthRules
    salesforce: SalesforceConfig
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def with_overrides(self, section: str, overrides: Mapping[str, Any] | None) -> Any:
        """The section's rules with a request's overrides deep-merged in and validated again."""
        if not overrides:
            return getattr(self, section)
        merged = deep_merge(dict(self.raw[section]), overrides)
        try:
            return _SECTIONS[section]().load(merged)
        except ValidationError as err:
            # Re-raised under "rules" (the request field carrying overrides) so the API names the exact field.
            raise ValidationError({"rules": err.messages}) from err


_SECTIONS: dict[str, type[Schema]] = {
    "jira": JiraSchema, "monitor": MonitorSchema, "weekly": WeeklySchema, "narrative": NarrativeSchema,
    "patterns": PatternSchema, "health": HealthSchema, "salesforce": SalesforceSchema,
}


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts merge key by key; anything else in `over` replaces the base value."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_config(raw: Any) -> DigestConfig:
    """Validate a parsed YAML document; raise ConfigError listing every problem by path."""
    if not isinstance(raw, dict):
        raise ConfigError("digest config must be a mapping")
    problems: list[str] = []
    if raw.get("version") != 1:
        problems.append(f"version: must be 1, got {raw.get('version')!r}")
    unknown = sorted(set(raw) - set(_SECTIONS) - {"version"})
    problems.extend(f"{k}: unknown section" for k in unknown)
    loaded: dict[str, Any] = {}
    for name, schema in _SECTIONS.items():
        if name not in raw:
            problems.append(f"{name}: missing section")
            continue
        try:
            loaded[name] = schema().load(raw[name] or {})
        except ValidationError as err:
            problems.extend(f"{name}.{p}" for p in describe_errors(err))
    if problems:
        raise ConfigError("invalid digest config:\n  - " + "\n  - ".join(problems))
    return DigestConfig(**loaded, raw=raw)


def load_config(config_dir: str | Path) -> DigestConfig:
    """Read and validate <config_dir>/digest.yaml."""
    path = Path(config_dir) / CONFIG_FILE
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[2] / path
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"digest config not found at {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"digest config {path} is not valid YAML: {exc}") from exc
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {path})") from exc

