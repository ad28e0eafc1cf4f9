"""Write operations guardrails knows: payload schemas, normalisation, the facts rules look at, human summaries.

A proposal's payload is validated per operation before anything is queued (400 naming the field); the
stored payload is exactly what will be written, so approvers see what executes. Ticket text is untrusted:
it is carried as data (ADF text nodes, Slack plain_text), never interpreted.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from shared.connectors.adf import adf_to_text, is_adf, text_to_adf

from .actions_policy import OPERATIONS, Facts

ISSUE_KEY = re.compile(r"^[A-Z][A-Z0-9_]{0,9}-[1-9][0-9]{0,9}$")
SLACK_CHANNEL = re.compile(r"^#?[a-z0-9][a-z0-9._-]{0,79}$")
LABEL = re.compile(r"^[^\s]{1,255}$")
PREVIEW_CHARS = 1500
MAX_ADF_DEPTH = 30
MAX_ADF_NODES = 5000

# ADF nodes and marks a comment may use (Atlassian's document structure, minus media and extensions).
ADF_NODES = frozenset({
    "paragraph", "text", "hardBreak", "heading", "bulletList", "orderedList", "listItem", "codeBlock",
    "blockquote", "rule", "panel", "mention", "emoji", "inlineCard", "status", "date", "table", "tableRow",
    "tableHeader", "tableCell"})
ADF_MARKS = frozenset({"strong", "em", "code", "strike", "underline", "link", "subsup", "textColor"})


def marker(action_id: uuid.UUID | str) -> str:
    """The line every Metis comment ends with: names the action, and lets a retry find a write that happened."""
    return f"Metis action {action_id}"


def project_of(issue_key: str) -> str:
    return issue_key.split("-", 1)[0]


def adf_problem(doc: Any) -> str | None:
    """Why `doc` is not an ADF document Metis will write, or None."""
    if not is_adf(doc):
        return "must be plain text or an ADF document {type: doc, version: 1, content: [...]}"
    count = 0

    def walk(node: Any, depth: int, path: str) -> str | None:
        nonlocal count
        count += 1
        if count > MAX_ADF_NODES:
            return f"more than {MAX_ADF_NODES} nodes"
        if depth > MAX_ADF_DEPTH:
            return f"{path}: nested deeper than {MAX_ADF_DEPTH}"
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            return f"{path}: a node must be an object with a type"
        kind = node["type"]
        if kind not in ADF_NODES:
            return f"{path}: node type {kind!r} is not allowed"
        if kind == "text":
            if not isinstance(node.get("text"), str) or not node["text"]:
                return f"{path}: a text node needs non-empty text"
            for m in node.get("marks") or []:
                if not isinstance(m, dict) or m.get("type") not in ADF_MARKS:
                    return f"{path}: mark {m!r} is not allowed"
                if m["type"] == "link":
                    href = str((m.get("attrs") or {}).get("href", ""))
                    if not re.match(r"^https?://", href):
                        return f"{path}: links must be http(s) URLs"
        content = node.get("content")
        if content is not None and not isinstance(content, list):
            return f"{path}.content: must be a list"
        for i, child in enumerate(content or []):
            err = walk(child, depth + 1, f"{path}.content[{i}]")
            if err:
                return err
        return None

    for i, child in enumerate(doc["content"]):
        err = walk(child, 1, f"content[{i}]")
        if err:
            return err
    if not adf_to_text(doc).strip():
        return "the comment has no text"
    return None


class CommentBody(fields.Field[dict[str, Any]]):
    """Plain text (turned into ADF) or an ADF document."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(value, str):
            if not value.strip():
                raise ValidationError("must not be empty")
            return text_to_adf(value)
        problem = adf_problem(value)
        if problem:
            raise ValidationError(problem)
        return dict(value)


class AddComment(Schema):
    body = CommentBody(required=True)
    internal = fields.Boolean(load_default=False)


class AddLabels(Schema):
    labels = fields.List(fields.String(validate=validate.Regexp(LABEL, error="a Jira label: 1-255 characters, "
                                                                              "no spaces")),
                         required=True, validate=validate.Length(min=1, max=20))


class LinkIssues(Schema):
    type = fields.String(required=True, validate=validate.Length(min=1, max=100))
    inward = fields.String(required=True, validate=validate.Regexp(ISSUE_KEY, error="a Jira issue key"))
    outward = fields.String(required=True, validate=validate.Regexp(ISSUE_KEY, error="a Jira issue key"))
    comment = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=4000))

    @validates_schema
    def _two_issues(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("inward") and data.get("inward") == data.get("outward"):
            raise ValidationError({"outward": ["an issue cannot be linked to itself"]})


class Transition(Schema):
    # The status to move the issue to: a state, not an event, so a retry can see whether it happened.
    to = fields.String(required=True, validate=validate.Length(min=1, max=100))


class PostMessage(Schema):
    text = fields.String(required=True, validate=validate.Length(min=1, max=40000))
    blocks = fields.List(fields.Dict(), load_default=None, allow_none=True, validate=validate.Length(max=50))


PAYLOADS: dict[str, type[Schema]] = {
    "jira.add_comment": AddComment,
    "jira.add_labels": AddLabels,
    "jira.link_issues": LinkIssues,
    "jira.transition": Transition,
    "slack.post_message": PostMessage,
}
assert set(PAYLOADS) == set(OPERATIONS)


@dataclass(frozen=True)
class Validated:
    """A proposal whose target and payload passed validation: what will be written, and what rules see."""

    payload: dict[str, Any]
    facts: Facts


def known(action: str) -> bool:
    return action in PAYLOADS


def validate_proposal(*, action: str, target: str, payload: Mapping[str, Any], task: str, action_id: uuid.UUID,
                      link_types: Callable[[], list[str]]) -> Validated:
    """Validate and normalise; raise ValidationError {target: ..., payload: {...}} naming every bad field.

    `link_types` is only called for links (it asks Jira, which may raise ConnectorError)."""
    errors: dict[str, Any] = {}
    connector = action.split(".", 1)[0]
    if connector == "jira" and not ISSUE_KEY.match(target):
        errors["target"] = ["must be a Jira issue key such as SUP-123"]
    if connector == "slack" and not SLACK_CHANNEL.match(target):
        errors["target"] = ["must name the Slack channel the incoming webhook posts to, e.g. #ops"]
    try:
        data = PAYLOADS[action]().load(dict(payload))
    except ValidationError as exc:
        errors["payload"] = exc.messages
        data = {}
    if errors:
        raise ValidationError(errors)

    facts = Facts(task=task)
    if action == "jira.add_comment":
        body = dict(data["body"])
        text_length = len(adf_to_text(body).strip())
        # The marker paragraph is part of what is written (and shown to the approver).
        body["content"] = [*body["content"], {"type": "paragraph", "content": [
            {"type": "text", "text": marker(action_id), "marks": [{"type": "em"}]}]}]
        data = {"body": body, "internal": data["internal"]}
        facts = Facts(task=task, projects=(project_of(target),), text_length=text_length)
    elif action == "jira.add_labels":
        data = {"labels": list(dict.fromkeys(data["labels"]))}
        facts = Facts(task=task, projects=(project_of(target),), labels=tuple(data["labels"]))
    elif action == "jira.link_issues":
        if target not in (data["inward"], data["outward"]):
            raise ValidationError({"target": ["must be one of the two linked issues (inward or outward)"]})
        names = {t.lower(): t for t in link_types()}
        if data["type"].lower() not in names:
            raise ValidationError({"payload": {"type": [f"unknown link type {data['type']!r}; this Jira has: "
                                                        f"{', '.join(sorted(names.values()))}"]}})
        data = {**data, "type": names[data["type"].lower()]}
        facts = Facts(task=task, projects=tuple(dict.fromkeys([project_of(data["inward"]),
                                                                project_of(data["outward"])])),
                      link_type=data["type"])
    elif action == "jira.transition":
        facts = Facts(task=task, projects=(project_of(target),), to_status=data["to"])
    elif action == "slack.post_message":
        if data.get("blocks") is None:
            data.pop("blocks", None)
        facts = Facts(task=task, text_length=len(data["text"]))
    return Validated(payload=data, facts=facts)


def _clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def summary(*, connector: str, operation: str, target: str, payload: Mapping[str, Any],
            jira_url: str | None) -> dict[str, Any]:
    """What will be written where, in words (for the Slack message, the e-mail and the form)."""
    action = f"{connector}.{operation}"
    browse = f"{jira_url.rstrip('/')}/browse/{target}" if jira_url and connector == "jira" else None
    if action == "jira.add_comment":
        visibility = "an internal comment" if payload.get("internal") else "a comment"
        title, preview = f"Add {visibility} to {target}", adf_to_text(payload.get("body"))
    elif action == "jira.add_labels":
        labels = [str(x) for x in payload.get("labels") or []]
        title, preview = f"Add labels to {target}", ", ".join(labels)
    elif action == "jira.link_issues":
        title = f"Link {payload.get('inward')} and {payload.get('outward')} ({payload.get('type')})"
        preview = f"{payload.get('inward')} → {payload.get('type')} → {payload.get('outward')}"
        if payload.get("comment"):
            preview += f"\n\n{payload['comment']}"
    elif action == "jira.transition":
        title, preview = f"Move {target} to {payload.get('to')}", f"new status: {payload.get('to')}"
    elif action == "slack.post_message":
        title, preview = f"Post a Slack message to {target}", str(payload.get("text", ""))
    else:
        title, preview = f"{action} on {target}", ""
    return {"title": _clip(title, 140), "where": f"{connector.capitalize()} {target}", "url": browse,
            "preview": _clip(preview) or "(empty)"}
