"""Policy and prices: loaded from YAML, validated with every error listed by path, turned into integer money."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from marshmallow import Schema, ValidationError, fields, validate

from .actions_policy import ActionPolicy, ActionsSchema, build_action_policy

MICROS_PER_USD = 1_000_000
NANOS_PER_MICRO = 1_000
TOKEN_KINDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
TIERS = ("cheap", "standard", "top")
TRIGGERS = ("event", "schedule", "manual")
_DATED = re.compile(r"^(?P<base>.+)-(\d{8}|latest)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class PolicyError(ValueError):
    """An invalid policy or prices file; `errors` lists every problem as (path, message)."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = sorted(errors)
        super().__init__("invalid guardrails configuration:\n" + "\n".join(f"  - {p}: {m}" for p, m in self.errors))


def usd_to_micros(value: Decimal) -> int:
    """Exact conversion; callers validated that `value` has at most 6 decimal places."""
    return int(value * MICROS_PER_USD)


def micros_to_usd(micros: int) -> float:
    """For display and metrics only — money is never computed in floats."""
    return micros / MICROS_PER_USD


class Money(fields.Decimal):
    """A non-negative USD amount with at most `places` decimals, kept as Decimal (never float)."""

    def __init__(self, places: int = 6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_places = places  # (marshmallow's own `places` rounds; this one refuses)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValidationError("must be a number")
        try:
            # str() first: a YAML float like 0.1 must mean exactly one tenth.
            dec = Decimal(str(value))
        except InvalidOperation:
            raise ValidationError("must be a number") from None
        if not dec.is_finite() or dec < 0:
            raise ValidationError("must be a finite number >= 0")
        if dec != dec.quantize(Decimal(1).scaleb(-self.max_places)):
            raise ValidationError(f"at most {self.max_places} decimal places")
        return dec


class PriceSchema(Schema):
    input = Money(places=3, required=True)
    output = Money(places=3, required=True)
    cache_write_5m = Money(places=3, required=True)
    cache_write_1h = Money(places=3, required=True)
    cache_read = Money(places=3, required=True)


class PricesSchema(Schema):
    unit = fields.String(required=True, validate=validate.Equal("usd_per_million_tokens"))
    models = fields.Dict(keys=fields.String(validate=validate.Regexp(_NAME)), values=fields.Nested(PriceSchema),
                         required=True, validate=validate.Length(min=1))


class LimitsSchema(Schema):
    daily_usd = Money(required=True)
    monthly_usd = Money(required=True)
    reservation_timeout_seconds = fields.Integer(required=True, strict=True, validate=validate.Range(min=10))


class AlertsSchema(Schema):
    thresholds_percent = fields.List(fields.Integer(strict=True, validate=validate.Range(min=1, max=100)),
                                     required=True, validate=validate.Length(min=1))


class ModelsSchema(Schema):
    tiers = fields.Dict(keys=fields.String(validate=validate.Regexp(_NAME)),
                        values=fields.String(validate=validate.OneOf(TIERS)), required=True)
    scheduled_tiers = fields.List(fields.String(validate=validate.OneOf(TIERS)), required=True)
    justification_min_chars = fields.Integer(load_default=20, strict=True, validate=validate.Range(min=1, max=2000))
    # Upstream retirement dates (model -> date). A task may not name a model past its date: every call
    # to it would fail while nobody watches. `metis policy check` warns ahead of the date.
    retirements = fields.Dict(keys=fields.String(validate=validate.Regexp(_NAME)), values=fields.Date(),
                              load_default=dict)


class InputBoundSchema(Schema):
    request_overhead_tokens = fields.Integer(required=True, strict=True, validate=validate.Range(min=0))
    tool_use_overhead_tokens = fields.Integer(required=True, strict=True, validate=validate.Range(min=0))
    image_tokens = fields.Integer(required=True, strict=True, validate=validate.Range(min=0))


class RunCapSchema(Schema):
    usd = Money(required=True)
    tokens = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))


class TaskSchema(Schema):
    models = fields.List(fields.String(), required=True, validate=validate.Length(min=1))
    triggers = fields.List(fields.String(validate=validate.OneOf(TRIGGERS)), required=True,
                           validate=validate.Length(min=1))
    allow_top_tier = fields.Boolean(load_default=False)
    run_cap = fields.Nested(RunCapSchema, required=True)
    daily_usd = Money(required=True)


class HeartbeatSchema(Schema):
    interval_seconds = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    grace_seconds = fields.Integer(load_default=0, strict=True, validate=validate.Range(min=0))


def _valid_timezone(tz: str) -> bool:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError("unknown time zone") from None
    return True


class PolicySchema(Schema):
    version = fields.Integer(required=True, strict=True, validate=validate.Equal(1))
    timezone = fields.String(load_default="UTC", validate=lambda tz: _valid_timezone(tz))
    limits = fields.Nested(LimitsSchema, required=True)
    alerts = fields.Nested(AlertsSchema, required=True)
    models = fields.Nested(ModelsSchema, required=True)
    input_bound = fields.Nested(InputBoundSchema, required=True)
    tasks = fields.Dict(keys=fields.String(validate=validate.Regexp(_NAME)), values=fields.Nested(TaskSchema),
                        required=True, validate=validate.Length(min=1))
    heartbeats = fields.Dict(keys=fields.String(validate=validate.Regexp(_NAME)),
                             values=fields.Nested(HeartbeatSchema), load_default=dict)
    # The write allowlist, approvals and execution limits (actions_policy.py).
    actions = fields.Nested(ActionsSchema, load_default=lambda: ActionsSchema().load({}))



@dataclass(frozen=True)
class Price:
    """Nano-dollars per token for each token kind (exact integers)."""

    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int

    @property
    def max_input(self) -> int:
        """The most expensive rate an input token can be billed at (uncached or written to either cache)."""
        return max(self.input, self.cache_write_5m, self.cache_write_1h)


@dataclass(frozen=True)
class TaskPolicy:
    name: str
    models: tuple[str, ...]
    triggers: tuple[str, ...]
    allow_top_tier: bool
    run_cap_micros: int
    run_cap_tokens: int
    daily_micros: int


@dataclass(frozen=True)
class Heartbeat:
    name: str
    interval_seconds: int
    grace_seconds: int


@dataclass(frozen=True)
class Policy:
    """The validated, immutable policy + prices every decision is made against."""

    timezone: str
    daily_micros: int
    monthly_micros: int
    reservation_timeout_seconds: int
    thresholds_percent: tuple[int, ...]
    tiers: Mapping[str, str]
    scheduled_tiers: tuple[str, ...]
    justification_min_chars: int
    request_overhead_tokens: int
    tool_use_overhead_tokens: int
    image_tokens: int
    tasks: Mapping[str, TaskPolicy]
    heartbeats: Mapping[str, Heartbeat]
    prices: Mapping[str, Price]
    actions: ActionPolicy
    digest: str
    raw: Mapping[str, Any] = field(repr=False)
    retirements: Mapping[str, date] = field(default_factory=dict)

    def resolve_model(self, model: str) -> str | None:
        """The priced model name for a requested id (dated ids map to their undated name), or None."""
        if model in self.prices:
            return model
        m = _DATED.match(model)
        if m and m.group("base") in self.prices:
            return m.group("base")
        return None

    def tier(self, model: str) -> str:
        return self.tiers[model]

    def retired_on(self, model: str, today: date) -> date | None:
        """The upstream retirement date of a priced model if it has passed (calls to it would fail)."""
        when = self.retirements.get(model)
        return when if when is not None and when <= today else None

    def retirement_warnings(self, today: date, *, within_days: int = 30) -> list[str]:
        """One line per task model that is retired or retires within `within_days` of `today`."""
        out = []
        for name, task in sorted(self.tasks.items()):
            for model in task.models:
                when = self.retirements.get(model)
                if when is None or (when - today).days > within_days:
                    continue
                verb = "was retired" if when <= today else "retires"
                out.append(f"task {name!r}: model {model!r} {verb} upstream on {when.isoformat()}; "
                           "calls to it are refused from that day — move the task to its successor")
        return out


def _flatten(messages: Any, prefix: str = "") -> list[tuple[str, str]]:
    """marshmallow's nested error dict -> [(dotted.path, message)]."""
    out: list[tuple[str, str]] = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key == "value" and isinstance(value, dict) and prefix:
                # Dict fields report value errors under "value"; the key already names the entry.
                out.extend(_flatten(value, prefix))
                continue
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "_schema":
                path = prefix or "(root)"
            out.extend(_flatten(value, path))
    elif isinstance(messages, list):
        if all(isinstance(m, str) for m in messages):
            out.extend((prefix or "(root)", m) for m in messages)
        else:
            for item in messages:
                out.extend(_flatten(item, prefix))
    else:
        out.append((prefix or "(root)", str(messages)))
    return out


def _rate(dec: Decimal) -> int:
    # USD per million tokens == micro-dollars per token; x1000 -> nano-dollars per token (3 decimals validated).
    return int(dec * NANOS_PER_MICRO)


def build_policy(policy_doc: Any, prices_doc: Any, *, source: str = "") -> Policy:
    """Validate both documents together and build a Policy, raising PolicyError with every problem."""
    # YAML turns 2026-11-30 into a date; the documents are stored as JSON and hashed, so keep them JSON.
    policy_doc, prices_doc = (json.loads(json.dumps(d, default=str)) for d in (policy_doc, prices_doc))
    errors: list[tuple[str, str]] = []
    pol: dict[str, Any] = {}
    pri: dict[str, Any] = {}
    if not isinstance(policy_doc, dict):
        errors.append(("policy", "must be a mapping"))
    else:
        try:
            pol = PolicySchema().load(policy_doc)
        except ValidationError as exc:
            errors.extend((f"policy.{p}", m) for p, m in _flatten(exc.messages))
    if not isinstance(prices_doc, dict):
        errors.append(("prices", "must be a mapping"))
    else:
        try:
            pri = PricesSchema().load(prices_doc)
        except ValidationError as exc:
            errors.extend((f"prices.{p}", m) for p, m in _flatten(exc.messages))
    if errors:
        raise PolicyError(errors)

    prices = {name: Price(**{k: _rate(v[k]) for k in TOKEN_KINDS}) for name, v in pri["models"].items()}
    tiers: dict[str, str] = pol["models"]["tiers"]
    for model in tiers:
        if model not in prices:
            errors.append((f"policy.models.tiers.{model}", "has no price in prices.yaml"))
    for model in pol["models"]["retirements"]:
        if model not in tiers:
            errors.append((f"policy.models.retirements.{model}", "has no tier in models.tiers"))
    for name, task in pol["tasks"].items():
        for i, model in enumerate(task["models"]):
            if model not in tiers:
                errors.append((f"policy.tasks.{name}.models.{i}", f"model {model!r} has no tier in models.tiers"))
            elif tiers[model] == "top" and not task["allow_top_tier"]:
                errors.append((f"policy.tasks.{name}.models.{i}",
                               f"model {model!r} is top tier but allow_top_tier is false"))
            elif (tiers[model] not in pol["models"]["scheduled_tiers"] and task["triggers"] == ["schedule"]):
                errors.append((f"policy.tasks.{name}.models.{i}",
                               f"model {model!r} ({tiers[model]}) can never be used: the task only runs on a "
                               "schedule and scheduled_tiers excludes it"))
        if task["run_cap"]["usd"] > task["daily_usd"]:
            errors.append((f"policy.tasks.{name}.run_cap.usd", "exceeds the task's daily_usd"))
    for i, rule in enumerate(pol["actions"]["rules"]):
        for j, task in enumerate(rule.get("tasks") or []):
            if task not in pol["tasks"]:
                errors.append((f"policy.actions.rules.{i}.tasks.{j}", f"unknown task {task!r}"))
    if pol["limits"]["daily_usd"] > pol["limits"]["monthly_usd"]:
        errors.append(("policy.limits.daily_usd", "exceeds limits.monthly_usd"))
    if errors:
        raise PolicyError(errors)

    digest = hashlib.sha256(json.dumps([policy_doc, prices_doc], sort_keys=True, default=str).encode()).hexdigest()
    return Policy(
        timezone=pol["timezone"],
        daily_micros=usd_to_micros(pol["limits"]["daily_usd"]),
        monthly_micros=usd_to_micros(pol["limits"]["monthly_usd"]),
        reservation_timeout_seconds=pol["limits"]["reservation_timeout_seconds"],
        thresholds_percent=tuple(sorted(set(pol["alerts"]["thresholds_percent"]))),
        tiers=dict(tiers),
        scheduled_tiers=tuple(pol["models"]["scheduled_tiers"]),
        justification_min_chars=pol["models"]["justification_min_chars"],
        request_overhead_tokens=pol["input_bound"]["request_overhead_tokens"],
        tool_use_overhead_tokens=pol["input_bound"]["tool_use_overhead_tokens"],
        image_tokens=pol["input_bound"]["image_tokens"],
        tasks={name: TaskPolicy(name=name, models=tuple(t["models"]), triggers=tuple(t["triggers"]),
                                allow_top_tier=t["allow_top_tier"],
                                run_cap_micros=usd_to_micros(t["run_cap"]["usd"]),
                                run_cap_tokens=t["run_cap"]["tokens"], daily_micros=usd_to_micros(t["daily_usd"]))
               for name, t in pol["tasks"].items()},
        heartbeats={name: Heartbeat(name, h["interval_seconds"], h["grace_seconds"])
                    for name, h in pol["heartbeats"].items()},
        prices=prices,
        actions=build_action_policy(pol["actions"]),
        digest=digest,
        retirements=dict(pol["models"]["retirements"]),
        raw={"policy": policy_doc, "prices": prices_doc, "source": source},
    )


def _read_yaml(path: Path, label: str, errors: list[tuple[str, str]]) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        errors.append((label, f"file not found: {path}"))
    except yaml.YAMLError as exc:
        errors.append((label, f"not valid YAML: {exc}".replace("\n", " ")))
    return None


def load_policy(config_dir: str | Path) -> Policy:
    """Read config_dir/policy.yaml and config_dir/prices.yaml; raise PolicyError listing every problem."""
    base = Path(config_dir)
    errors: list[tuple[str, str]] = []
    policy_doc = _read_yaml(base / "policy.yaml", "policy", errors)
    prices_doc = _read_yaml(base / "prices.yaml", "prices", errors)
    if errors:
        raise PolicyError(errors)
    return build_policy(policy_doc, prices_doc, source=str(base.resolve()))


def policy_from_stored(doc: Mapping[str, Any]) -> Policy:
    """Rebuild a Policy from the documents recorded in the database by a reload."""
    return build_policy(doc["policy"], doc["prices"], source=str(doc.get("source", "")))
