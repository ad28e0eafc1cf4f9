"""The duplicate flow's logic: which Jira deliveries are checked, the ticket they carry, and the proposals
built from dedupe's answer (by code only: keys, scores and reasons from the stored check, never ticket text
taken as instructions). No Flask here; see intake_api.py for the endpoints."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from shared.connectors.adf import adf_to_text
from shared.jira_webhooks import JIRA_KEY

from .config import ConfigError

EVENTS = frozenset({"jira:issue_created"})
FILE = "dedupe_intake.yaml"

_URL = re.compile(r"(?i)\b(?:https?|ftp|file|javascript|data):[^\s<>()\]\"']+")
_MENTION = re.compile(r"\[~[^\]]{1,100}\]|@(?:channel|here|everyone|all)\b", re.I)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class IntakeConfig:
    """config/dedupe_intake.yaml: the defects the flow checks and what it proposes."""

    issue_types: frozenset[str] = frozenset({"bug"})  # lower case
    projects: frozenset[str] = frozenset()            # empty: every project
    search_limit: int = 5
    comment_candidates: int = 3
    link_type: str = "Duplicate"


def load_intake_config(config_dir: str | Path) -> IntakeConfig:
    """Read <config_dir>/dedupe_intake.yaml (else the repository's); raise ConfigError naming every bad path."""
    path = Path(config_dir) / FILE
    if not path.is_file():
        path = Path(__file__).resolve().parents[2] / "config" / FILE
        if not path.is_file():
            return IntakeConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    problems += [f"{k}: unknown setting" for k in raw if k not in {"issue_types", "projects", "search", "proposals"}]

    def names(key: str, default: list[str]) -> list[str]:
        value = raw.get(key, default)
        if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() for x in value):
            problems.append(f"{key}: must be a list of names")
            return default
        return value

    def section(key: str, spec: dict[str, type]) -> dict[str, Any]:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            problems.append(f"{key}: must be a mapping")
            return {}
        problems.extend(f"{key}.{k}: unknown setting" for k in value if k not in spec)
        out: dict[str, Any] = {}
        for k, kind in spec.items():
            if k not in value:
                continue
            v = value[k]
            if kind is int and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 100):
                problems.append(f"{key}.{k}: must be an integer from 1 to 100, got {v!r}")
            elif kind is str and (not isinstance(v, str) or not v.strip()):
                problems.append(f"{key}.{k}: must be a non-empty string, got {v!r}")
            else:
                out[k] = v
        return out

    types = names("issue_types", ["Bug"])
    projects = names("projects", [])
    problems += [f"projects: {p!r} is not a Jira project key" for p in projects
                 if not re.match(r"^[A-Z][A-Z0-9_]{0,30}$", p)]
    search = section("search", {"limit": int})
    proposals = section("proposals", {"comment_candidates": int, "link_type": str})
    if not types:
        problems.append("issue_types: name at least one issue type")
    if problems:
        raise ConfigError(f"invalid {path}:\n  - " + "\n  - ".join(problems))
    return IntakeConfig(issue_types=frozenset(t.strip().lower() for t in types), projects=frozenset(projects),
                        search_limit=search.get("limit", 5),
                        comment_candidates=proposals.get("comment_candidates", 3),
                        link_type=proposals.get("link_type", "Duplicate"))


def _name(obj: Any) -> str | None:
    return obj.get("name") if isinstance(obj, dict) and isinstance(obj.get("name"), str) else None


def issue_type(issue: Mapping[str, Any]) -> str | None:
    return _name((issue.get("fields") or {}).get("issuetype"))


def project_key(issue: Mapping[str, Any]) -> str | None:
    project = (issue.get("fields") or {}).get("project")
    key = project.get("key") if isinstance(project, dict) else None
    return key if isinstance(key, str) else str(issue.get("key", "")).rsplit("-", 1)[0] or None


def ignored_because(issue: Mapping[str, Any], cfg: IntakeConfig) -> str | None:
    """Why this issue is not checked (not a defect, or a project outside the configured ones); None: check it."""
    kind = issue_type(issue)
    if (kind or "").lower() not in cfg.issue_types:
        return f"issue type {str(kind)[:60]!r} is not checked for duplicates (checked: {', '.join(sorted(cfg.issue_types))})"
    project = project_key(issue)
    if cfg.projects and project not in cfg.projects:
        return f"project {str(project)[:30]!r} is not checked for duplicates (checked: {', '.join(sorted(cfg.projects))})"
    return None


def ticket_from_issue(issue: Mapping[str, Any]) -> dict[str, Any]:
    """A Jira issue (webhook body, REST v2 or v3 shape) as dedupe's ticket: names, not objects."""
    f = issue.get("fields") or {}
    return {
        "key": issue.get("key"),
        "summary": f.get("summary") if isinstance(f.get("summary"), str) else "",
        "description": adf_to_text(f.get("description")),
        "created": f.get("created"),
        "updated": f.get("updated"),
        "status": _name(f.get("status")),
        "priority": _name(f.get("priority")),
        "components": [c["name"] for c in f.get("components") or [] if isinstance(c, dict) and isinstance(c.get("name"), str)],
        "labels": [lb for lb in f.get("labels") or [] if isinstance(lb, str)],
        "project": project_key(issue),
    }


def _clean(text: Any, limit: int) -> str:
    """Indexed text quoted in a comment: one line, no links or mentions, cut to `limit` characters."""
    s = _CONTROL.sub(" ", str(text or ""))
    s = _MENTION.sub("[mention removed]", _URL.sub("[link removed]", s))
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 1].rstrip() + "…"


def duplicate_of(answer: Mapping[str, Any]) -> str | None:
    """The candidate a "duplicate" verdict names: the one the LLM confirmed, else the best one."""
    if answer.get("verdict") != "duplicate":
        return None
    keys = [c.get("key") for c in answer.get("candidates") or []]
    confirmed = (answer.get("llm") or {}).get("duplicate_of")
    key = confirmed if confirmed in keys else (keys[0] if keys else None)
    return key if isinstance(key, str) and JIRA_KEY.match(key) else None


def comment_text(issue_key: str, answer: Mapping[str, Any], cfg: IntakeConfig) -> str:
    """The internal comment on the new ticket: the verdict and the best candidates with scores and reasons."""
    candidates = list(answer.get("candidates") or [])[: cfg.comment_candidates]
    target = duplicate_of(answer)
    if target:
        head = (f"Metis duplicate check: {issue_key} appears to duplicate {target} "
                f"(confidence {float(answer.get('confidence') or 0):.2f}).")
    else:
        head = (f"Metis duplicate check: {issue_key} may duplicate an earlier ticket "
                f"(best confidence {float(answer.get('confidence') or 0):.2f}); please compare:")
    lines = [head, "", "Candidates, best first:"]
    for i, c in enumerate(candidates, 1):
        status = f", {_clean(c.get('status'), 40)}" if c.get("status") else ""
        lines.append(f"{i}. {_clean(c.get('key'), 40)} (score {float(c.get('score') or 0):.3f}, "
                     f"confidence {float(c.get('confidence') or 0):.2f}{status}): \"{_clean(c.get('summary'), 140)}\"")
        reasons = "; ".join(_clean(r, 160) for r in (c.get("reasons") or [])[:6])
        if reasons:
            lines.append(f"   why: {reasons}")
    lines += ["", f"Verdict {answer.get('verdict')} ({_clean(answer.get('mode'), 20)}: "
                  f"{_clean(answer.get('mode_detail'), 300)})."]
    llm = answer.get("llm") if answer.get("mode") == "llm" else None
    if isinstance(llm, dict) and llm.get("rationale"):
        # The model's reading helps whoever compares; it is model output about untrusted text: cleaned, quoted.
        named = f" (named {_clean(llm.get('duplicate_of'), 40)})" if llm.get("duplicate_of") else ""
        lines.append(f"Model's reading{named}: \"{_clean(llm.get('rationale'), 400)}\"")
    if target:
        lines.append(f"A \"{cfg.link_type}\" link ({issue_key} duplicates {target}) is proposed with this comment.")
    return "\n".join(lines)


def build_proposals(*, run_id: str, issue_key: str, answer: Mapping[str, Any],
                    cfg: IntakeConfig) -> list[dict[str, Any]]:
    """Guardrails proposals (POST /v1/actions bodies) for a stored answer: none for "none", a comment for
    "possible", a comment and a link (inward = the new ticket, outward = the one it duplicates) for "duplicate"."""
    if answer.get("verdict") not in ("duplicate", "possible") or not answer.get("candidates"):
        return []
    proposals = [{
        "run_id": run_id, "connector": "jira", "operation": "add_comment", "target": issue_key,
        "payload": {"body": comment_text(issue_key, answer, cfg), "internal": True},
        "idempotency_key": f"dedupe:{issue_key}:comment",
        "reason": f"dedupe verdict {answer.get('verdict')} for {issue_key}: best candidates named for a triager",
    }]
    target = duplicate_of(answer)
    if target and target != issue_key:
        proposals.append({
            "run_id": run_id, "connector": "jira", "operation": "link_issues", "target": issue_key,
            "payload": {"type": cfg.link_type, "inward": issue_key, "outward": target},
            "idempotency_key": f"dedupe:{issue_key}:duplicate-of:{target}",
            "reason": f"dedupe verdict duplicate: {issue_key} duplicates {target} "
                      f"(confidence {float(answer.get('confidence') or 0):.2f}, {answer.get('mode')})",
        })
    return proposals
