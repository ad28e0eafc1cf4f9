"""The write allowlist (`actions:` in policy.yaml): ordered rules per connector.operation, first match decides.

Read-only by default: an operation no rule matches is denied, and so is one a `deny` rule matches. Every
decision names the rule that made it (`default:deny` when none matched). Conditions only narrow a rule:

    rules:
      - name: triage-comment          # unique; what the decision, the audit entry and the approver see
        action: jira.add_comment      # connector.operation (OPERATIONS below)
        mode: approve                 # allow (execute at once) | approve (a human decides) | deny
        tasks: [triage]               # the proposing run's task
        projects: [SUP, PAY]          # Jira project of the target (and of the other issue of a link)
        max_comment_length: 4000      # characters of the comment's text
        expires_seconds: 86400        # approve only: time to decide (default approval.expires_seconds)

This module does not import policy.py (which imports it).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
PROJECT_KEY = re.compile(r"^[A-Z][A-Z0-9_]{0,9}$")
MODES = ("allow", "approve", "deny")
DEFAULT_RULE = "default:deny"

# connector.operation -> the conditions that mean something for it.
OPERATIONS: dict[str, frozenset[str]] = {
    "jira.add_comment": frozenset({"tasks", "projects", "max_comment_length"}),
    "jira.add_labels": frozenset({"tasks", "projects", "labels"}),
    "jira.link_issues": frozenset({"tasks", "projects", "link_types"}),
    "jira.transition": frozenset({"tasks", "projects", "transitions"}),
    "slack.post_message": frozenset({"tasks", "max_text_length"}),
}
CONDITIONS = ("tasks", "projects", "labels", "max_comment_length", "max_text_length", "link_types", "transitions")


class RuleSchema(Schema):
    name = fields.String(required=True, validate=validate.Regexp(_NAME, error="lower-case letters, digits, . _ -"))
    action = fields.String(required=True, validate=validate.OneOf(sorted(OPERATIONS)))
    mode = fields.String(required=True, validate=validate.OneOf(MODES))
    description = fields.String(load_default="")
    tasks = fields.List(fields.String(validate=validate.Regexp(_NAME)), validate=validate.Length(min=1))
    projects = fields.List(fields.String(validate=validate.Regexp(PROJECT_KEY.pattern, error="a Jira project key")),
                           validate=validate.Length(min=1))
    labels = fields.List(fields.String(validate=validate.Length(min=1, max=255)), validate=validate.Length(min=1))
    max_comment_length = fields.Integer(strict=True, validate=validate.Range(min=1, max=32767))
    max_text_length = fields.Integer(strict=True, validate=validate.Range(min=1, max=40000))
    link_types = fields.List(fields.String(validate=validate.Length(min=1)), validate=validate.Length(min=1))
    transitions = fields.List(fields.String(validate=validate.Length(min=1)), validate=validate.Length(min=1))
    expires_seconds = fields.Integer(strict=True, validate=validate.Range(min=1, max=30 * 86400))

    @validates_schema
    def _conditions_fit_the_operation(self, data: dict[str, Any], **_: Any) -> None:
        allowed = OPERATIONS.get(data.get("action", ""), frozenset(CONDITIONS))
        errors: dict[str, list[str]] = {}
        for cond in CONDITIONS:
            if cond in data and cond not in allowed:
                errors[cond] = [f"does not apply to {data.get('action')} (conditions: {', '.join(sorted(allowed))})"]
        if "expires_seconds" in data and data.get("mode") != "approve":
            errors["expires_seconds"] = ["only an approve rule has an approval time limit"]
        if errors:
            raise ValidationError(errors)


class ApprovalSchema(Schema):
    expires_seconds = fields.Integer(load_default=86400, strict=True, validate=validate.Range(min=1, max=30 * 86400))
    # Who may decide: glob patterns on the identity the approver gives (the e-mail in the n8n form).
    approvers = fields.List(fields.String(validate=validate.Length(min=1, max=200)), load_default=list)


class ExecutionSchema(Schema):
    http_attempts = fields.Integer(load_default=4, strict=True, validate=validate.Range(min=1, max=10))
    request_timeout_seconds = fields.Integer(load_default=15, strict=True, validate=validate.Range(min=1, max=300))
    # Longest total wait for Retry-After between attempts; past it the action fails (retryable by ops).
    retry_budget_seconds = fields.Integer(load_default=60, strict=True, validate=validate.Range(min=0, max=3600))
    # An action `executing` for longer than this was abandoned by a crashed worker and is recovered.
    lease_seconds = fields.Integer(load_default=300, strict=True, validate=validate.Range(min=1, max=86400))

    @validates_schema
    def _lease_outlasts_an_execution(self, data: dict[str, Any], **_: Any) -> None:
        worst = data["retry_budget_seconds"] + data["http_attempts"] * data["request_timeout_seconds"] + 2
        if data["lease_seconds"] < worst:
            raise ValidationError({"lease_seconds": [
                f"must be >= retry_budget_seconds + http_attempts x request_timeout_seconds + 2 = {worst}: "
                "a live execution must never be mistaken for an abandoned one"]})


class ActionsSchema(Schema):
    approval = fields.Nested(ApprovalSchema, load_default=lambda: ApprovalSchema().load({}))
    execution = fields.Nested(ExecutionSchema, load_default=lambda: ExecutionSchema().load({}))
    rules = fields.List(fields.Nested(RuleSchema), load_default=list)

    @validates_schema
    def _unique_names(self, data: dict[str, Any], **_: Any) -> None:
        seen: set[str] = set()
        for i, rule in enumerate(data.get("rules") or []):
            if rule["name"] in seen:
                raise ValidationError({"rules": {i: {"name": [f"duplicate rule name {rule['name']!r}"]}}})
            seen.add(rule["name"])


@dataclass(frozen=True)
class Rule:
    """One allowlist rule; conditions left out (None) do not narrow it."""

    name: str
    action: str
    mode: str
    description: str = ""
    tasks: tuple[str, ...] | None = None
    projects: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    max_comment_length: int | None = None
    max_text_length: int | None = None
    link_types: tuple[str, ...] | None = None
    transitions: tuple[str, ...] | None = None
    expires_seconds: int | None = None

    def mismatch(self, facts: "Facts") -> str | None:
        """Why this rule does not apply to the proposal (None: it applies)."""
        if self.tasks is not None and facts.task not in self.tasks:
            return f"task {facts.task!r} not in {list(self.tasks)}"
        if self.projects is not None:
            bad = [p for p in facts.projects if p not in self.projects]
            if bad or not facts.projects:
                return f"project {', '.join(bad) or '(none)'} not in {list(self.projects)}"
        if self.labels is not None:
            bad = [lb for lb in facts.labels if not any(fnmatch.fnmatchcase(lb, p) for p in self.labels)]
            if bad:
                return f"label {', '.join(bad)} not allowed (allowed: {list(self.labels)})"
        if self.max_comment_length is not None and facts.text_length > self.max_comment_length:
            return f"comment of {facts.text_length} characters exceeds {self.max_comment_length}"
        if self.max_text_length is not None and facts.text_length > self.max_text_length:
            return f"text of {facts.text_length} characters exceeds {self.max_text_length}"
        if self.link_types is not None and facts.link_type.lower() not in {t.lower() for t in self.link_types}:
            return f"link type {facts.link_type!r} not in {list(self.link_types)}"
        if self.transitions is not None and facts.to_status.lower() not in {t.lower() for t in self.transitions}:
            return f"transition to {facts.to_status!r} not in {list(self.transitions)}"
        return None


@dataclass(frozen=True)
class Facts:
    """What the conditions look at, extracted from a validated proposal."""

    task: str
    projects: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    text_length: int = 0
    link_type: str = ""
    to_status: str = ""


@dataclass(frozen=True)
class Decision:
    """The allowlist's answer: mode, the rule that decided, and a sentence saying why."""

    mode: str
    rule: str
    explanation: str
    expires_seconds: int | None = None


@dataclass(frozen=True)
class ActionPolicy:
    """The validated `actions:` section."""

    rules: tuple[Rule, ...] = ()
    expires_seconds: int = 86400
    approvers: tuple[str, ...] = ()
    http_attempts: int = 4
    request_timeout_seconds: int = 15
    retry_budget_seconds: int = 60
    lease_seconds: int = 300
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def decide(self, action: str, facts: Facts) -> Decision:
        """First matching rule for `action` wins; none matching means denied (read-only by default)."""
        misses: list[str] = []
        for rule in self.rules:
            if rule.action != action:
                continue
            why_not = rule.mismatch(facts)
            if why_not is None:
                if rule.mode == "deny":
                    return Decision("deny", rule.name, f"rule {rule.name} denies {action}"
                                    + (f": {rule.description}" if rule.description else ""))
                verb = "allows" if rule.mode == "allow" else "requires approval for"
                expires = (rule.expires_seconds or self.expires_seconds) if rule.mode == "approve" else None
                return Decision(rule.mode, rule.name, f"rule {rule.name} {verb} {action}", expires)
            misses.append(f"{rule.name}: {why_not}")
        if not misses:
            return Decision("deny", DEFAULT_RULE, f"no rule allows {action} (read-only by default)")
        return Decision("deny", DEFAULT_RULE, f"no rule allows this {action} (" + "; ".join(misses) + ")")

    def approver_allowed(self, approver: str) -> bool:
        """True when `approver` matches one of approval.approvers (case-insensitive); no patterns: anyone."""
        if not self.approvers:
            return True
        who = approver.strip().lower()
        return any(fnmatch.fnmatchcase(who, p.lower()) for p in self.approvers)


def build_action_policy(section: Mapping[str, Any]) -> ActionPolicy:
    """From the section as loaded by ActionsSchema."""
    rules = []
    for r in section.get("rules") or []:
        conditions: dict[str, Any] = {k: (tuple(r[k]) if isinstance(r[k], list) else r[k])
                                      for k in (*CONDITIONS, "expires_seconds") if k in r}
        rules.append(Rule(name=r["name"], action=r["action"], mode=r["mode"], description=r.get("description", ""),
                          **conditions))
    approval = section.get("approval") or ApprovalSchema().load({})
    execution = section.get("execution") or ExecutionSchema().load({})
    return ActionPolicy(rules=tuple(rules), expires_seconds=approval["expires_seconds"],
                        approvers=tuple(approval["approvers"]), http_attempts=execution["http_attempts"],
                        request_timeout_seconds=execution["request_timeout_seconds"],
                        retry_budget_seconds=execution["retry_budget_seconds"],
                        lease_seconds=execution["lease_seconds"], raw=dict(section))


def rule_names(policy: ActionPolicy) -> Sequence[str]:
    return [r.name for r in policy.rules]
