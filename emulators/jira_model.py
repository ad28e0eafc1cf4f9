"""In-memory Jira Cloud site: projects, users, issues, comments, links, changelog, and their REST v3 shapes."""
from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from emulators import jira_jql

STATUS_CATEGORIES: dict[str, dict[str, Any]] = {
    "new": {"id": 2, "key": "new", "colorName": "blue-gray", "name": "To Do"},
    "indeterminate": {"id": 4, "key": "indeterminate", "colorName": "yellow", "name": "In Progress"},
    "done": {"id": 3, "key": "done", "colorName": "green", "name": "Done"},
}
# name → (id, category key)
STATUSES: dict[str, tuple[str, str]] = {
    "To Do": ("10000", "new"),
    "In Progress": ("3", "indeterminate"),
    "Waiting for Customer": ("10002", "indeterminate"),
    "Done": ("10001", "done"),
}
# transition id → (name, target status); every transition is global (available from any other status)
TRANSITIONS: dict[str, tuple[str, str]] = {
    "11": ("To Do", "To Do"),
    "21": ("In Progress", "In Progress"),
    "31": ("Done", "Done"),
    "41": ("Wait for Customer", "Waiting for Customer"),
}
# name → (id, rank for ORDER BY priority: higher = more urgent)
PRIORITIES: dict[str, tuple[str, int]] = {
    "Blocker": ("10000", 7), "Highest": ("1", 6), "Critical": ("10001", 5), "High": ("2", 4),
    "Medium": ("3", 3), "Low": ("4", 2), "Lowest": ("5", 1),
}
ISSUE_TYPES: dict[str, str] = {"Epic": "10000", "Task": "10001", "Story": "10002", "Bug": "10004",
                               "Incident": "10005", "Service Request": "10006", "Sub-task": "10003"}
RESOLUTIONS: dict[str, str] = {"Done": "10000", "Won't Do": "10001", "Duplicate": "10002", "Cannot Reproduce": "10003"}
LINK_TYPES: list[dict[str, str]] = [
    {"id": "10000", "name": "Blocks", "inward": "is blocked by", "outward": "blocks"},
    {"id": "10001", "name": "Cloners", "inward": "is cloned by", "outward": "clones"},
    {"id": "10002", "name": "Duplicate", "inward": "is duplicated by", "outward": "duplicates"},
    {"id": "10003", "name": "Relates", "inward": "relates to", "outward": "relates to"},
    {"id": "10004", "name": "Problem/Incident", "inward": "is caused by", "outward": "causes"},
]
# custom field id → (name, kind, schema type)
DEFAULT_CUSTOM_FIELDS: dict[str, tuple[str, str, str]] = {
    "customfield_10021": ("Flagged", "value", "array"),
    "customfield_10100": ("Client", "value", "option"),
    "customfield_10101": ("Organizations", "value", "array"),
}
SYSTEM_FIELDS: dict[str, str] = {  # JQL name (lower) → kind
    "project": "value", "key": "value", "issuekey": "value", "id": "number", "status": "value",
    "statuscategory": "value", "priority": "value", "issuetype": "value", "type": "value", "labels": "value",
    "component": "value", "components": "value", "resolution": "value", "assignee": "value", "reporter": "value",
    "creator": "value", "summary": "text", "description": "text", "comment": "text", "text": "text",
    "environment": "text", "created": "date", "createddate": "date", "updated": "date", "updateddate": "date",
    "resolved": "date", "resolutiondate": "date", "duedate": "date", "due": "date", "issuelinktype": "value",
}
EDITABLE = {"summary", "description", "priority", "labels", "components", "assignee", "reporter", "duedate",
            "environment", "issuetype"}
DEFAULT_PROJECTS = {"SUP": "Payroll Support", "PAY": "Payroll Engine", "OPS": "Operations"}


def fmt_ts(dt: datetime) -> str:
    """Jira's timestamp format: 2024-01-15T09:30:00.000+0000."""
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+0000"


def parse_ts(value: Any) -> datetime:
    """Parse an ISO-8601 / Jira timestamp or a date; naive values are UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    text = str(value).strip()
    text = re.sub(r"([+-]\d\d)(\d\d)$", r"\1:\2", text.replace("Z", "+00:00"))
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def text_to_adf(text: str) -> dict[str, Any]:
    """Plain text → an ADF document, one paragraph per line block."""
    paras = [p for p in str(text).split("\n\n")] or [""]
    return {"type": "doc", "version": 1, "content": [
        {"type": "paragraph", "content": ([{"type": "text", "text": p}] if p else [])} for p in paras]}


def adf_to_text(node: Any) -> str:
    """The plain text of an ADF document (paragraphs separated by blank lines)."""
    if node is None:
        return ""
    if isinstance(node, str):
        return node
    if not isinstance(node, dict):
        return ""
    if node.get("type") == "text":
        return str(node.get("text", ""))
    if node.get("type") == "hardBreak":
        return "\n"
    if node.get("type") in ("mention", "emoji"):
        return str((node.get("attrs") or {}).get("text", ""))
    parts = [adf_to_text(c) for c in node.get("content") or []]
    sep = "\n\n" if node.get("type") in ("doc", "bulletList", "orderedList", "blockquote", "panel") else ""
    if node.get("type") == "listItem":
        sep = "\n"
    return sep.join(parts)


def adf_error(doc: Any) -> str | None:
    """Why `doc` is not a valid ADF document, or None."""
    if not isinstance(doc, dict):
        return "Operation value must be an Atlassian Document (see the Atlassian Document Format)"
    if doc.get("type") != "doc" or doc.get("version") != 1 or not isinstance(doc.get("content"), list):
        return "Operation value must be an Atlassian Document (see the Atlassian Document Format)"

    def walk(node: Any, depth: int) -> str | None:
        if depth > 50 or not isinstance(node, dict) or not isinstance(node.get("type"), str):
            return "Operation value must be an Atlassian Document (see the Atlassian Document Format)"
        if node["type"] == "text" and not isinstance(node.get("text"), str):
            return "Operation value must be an Atlassian Document (see the Atlassian Document Format)"
        for child in node.get("content") or []:
            err = walk(child, depth + 1)
            if err:
                return err
        return None

    for child in doc["content"]:
        err = walk(child, 1)
        if err:
            return err
    return None


@dataclass
class Comment:
    id: int
    author: str
    body: dict[str, Any]
    created: datetime
    updated: datetime
    visibility: dict[str, Any] | None = None


@dataclass
class Issue:
    id: int
    key: str
    project: str
    fields: dict[str, Any]
    comments: list[Comment] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Link:
    id: int
    type: dict[str, str]
    source: str  # POST inwardIssue: the issue that "blocks" / "duplicates" (outward description)
    dest: str    # POST outwardIssue: the issue that "is blocked by" / "is duplicated by"


class JiraSite:
    """The whole emulated site behind one re-entrant lock."""

    def __init__(self, bot_email: str) -> None:
        self.lock = threading.RLock()
        self.base_url = "http://127.0.0.1"
        self.bot_email = bot_email
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.projects: dict[str, dict[str, Any]] = {}
            self.counters: dict[str, int] = {}
            self.issues: dict[str, Issue] = {}
            self.by_id: dict[int, Issue] = {}
            self.links: list[Link] = []
            self.users: dict[str, dict[str, Any]] = {}
            self.custom_fields = dict(DEFAULT_CUSTOM_FIELDS)
            self.components: dict[tuple[str, str], str] = {}
            self.next_issue_id = 10000
            self.next_comment_id = 10000
            self.next_link_id = 10000
            self.next_history_id = 10000
            self.version = 0
            self.search_cache: dict[tuple[str, int], list[str]] = {}
            self.bot = self.ensure_user(self.bot_email, "Metis Bot")
            for key, name in DEFAULT_PROJECTS.items():
                self.ensure_project(key, name)

    # ------------------------------------------------------------ registries

    def touch(self) -> None:
        """Any mutation invalidates cached search results."""
        self.version += 1
        self.search_cache.clear()

    def ensure_project(self, key: str, name: str | None = None) -> dict[str, Any]:
        key = key.upper()
        if key not in self.projects:
            pid = str(10000 + len(self.projects))
            self.projects[key] = {"id": pid, "key": key, "name": name or key.title(), "projectTypeKey": "software"}
            self.counters.setdefault(key, 0)
        return self.projects[key]

    def ensure_user(self, ident: str, display: str | None = None) -> str:
        """Account id for an email / account id / display name, creating the user if new."""
        for acc, u in self.users.items():
            if ident in (acc, u.get("emailAddress"), u["displayName"]):
                return acc
        acc = "712020:" + hashlib.sha256(ident.encode()).hexdigest()[:24]
        email = ident if "@" in ident else None
        name = display or (ident.split("@")[0].replace(".", " ").title() if email else ident)
        self.users[acc] = {"accountId": acc, "displayName": name, "active": True, "timeZone": "UTC",
                           "accountType": "atlassian", **({"emailAddress": email} if email else {})}
        return acc

    def ensure_component(self, project: str, name: str) -> str:
        key = (project, name)
        if key not in self.components:
            self.components[key] = str(10000 + len(self.components))
        return self.components[key]

    def link_type(self, name: str | None = None, id_: str | None = None) -> dict[str, str] | None:
        for lt in LINK_TYPES:
            if (name and lt["name"].lower() == name.lower()) or (id_ and lt["id"] == str(id_)):
                return lt
        return None

    def custom_field_by_name(self, name: str) -> str | None:
        low = name.lower()
        for fid, (fname, _, _) in self.custom_fields.items():
            if fid == low or fname.lower() == low:
                return fid
        return None

    # ------------------------------------------------------------ rendering

    def user_json(self, acc: str | None, api: int = 3) -> dict[str, Any] | None:
        if not acc or acc not in self.users:
            return None
        u = self.users[acc]
        return {"self": f"{self.base_url}/rest/api/{api}/user?accountId={acc}", **u,
                "avatarUrls": {s: f"{self.base_url}/avatar/{acc}?s={s[:2]}" for s in ("48x48", "24x24", "16x16", "32x32")}}

    def status_json(self, name: str, api: int = 3) -> dict[str, Any]:
        sid, cat = STATUSES[name]
        c = STATUS_CATEGORIES[cat]
        return {"self": f"{self.base_url}/rest/api/{api}/status/{sid}", "description": "", "name": name, "id": sid,
                "iconUrl": f"{self.base_url}/images/icons/statuses/generic.png",
                "statusCategory": {"self": f"{self.base_url}/rest/api/{api}/statuscategory/{c['id']}", **c}}

    def named_json(self, kind: str, name: str | None, api: int = 3) -> dict[str, Any] | None:
        if name is None:
            return None
        if kind == "priority":
            pid = PRIORITIES[name][0]
            return {"self": f"{self.base_url}/rest/api/{api}/priority/{pid}", "iconUrl": f"{self.base_url}/images/icons/priorities/{name.lower()}.svg",
                    "name": name, "id": pid}
        if kind == "issuetype":
            tid = ISSUE_TYPES[name]
            return {"self": f"{self.base_url}/rest/api/{api}/issuetype/{tid}", "id": tid, "description": "", "name": name,
                    "iconUrl": f"{self.base_url}/images/icons/issuetypes/{tid}.svg", "subtask": name == "Sub-task", "avatarId": int(tid)}
        rid = RESOLUTIONS.get(name, "10000")
        return {"self": f"{self.base_url}/rest/api/{api}/resolution/{rid}", "id": rid, "description": "", "name": name}

    def comment_json(self, issue: Issue, c: Comment, api: int = 3) -> dict[str, Any]:
        out = {"self": f"{self.base_url}/rest/api/{api}/issue/{issue.id}/comment/{c.id}", "id": str(c.id),
               "author": self.user_json(c.author, api), "body": c.body if api == 3 else adf_to_text(c.body),
               "updateAuthor": self.user_json(c.author, api), "created": fmt_ts(c.created),
               "updated": fmt_ts(c.updated), "jsdPublic": True}
        if c.visibility:
            out["visibility"] = c.visibility
        return out

    def issue_ref(self, key: str, api: int = 3) -> dict[str, Any]:
        other = self.issues[key]
        return {"id": str(other.id), "key": key, "self": f"{self.base_url}/rest/api/{api}/issue/{other.id}",
                "fields": {"summary": other.fields["summary"], "status": self.status_json(other.fields["status"], api),
                           "priority": self.named_json("priority", other.fields.get("priority"), api),
                           "issuetype": self.named_json("issuetype", other.fields["issuetype"], api)}}

    def links_json(self, issue: Issue, api: int = 3) -> list[dict[str, Any]]:
        out = []
        for link in self.links:
            t = {**link.type, "self": f"{self.base_url}/rest/api/{api}/issueLinkType/{link.type['id']}"}
            if link.source == issue.key and link.dest in self.issues:
                out.append({"id": str(link.id), "self": f"{self.base_url}/rest/api/{api}/issueLink/{link.id}", "type": t,
                            "outwardIssue": self.issue_ref(link.dest, api)})
            elif link.dest == issue.key and link.source in self.issues:
                out.append({"id": str(link.id), "self": f"{self.base_url}/rest/api/{api}/issueLink/{link.id}", "type": t,
                            "inwardIssue": self.issue_ref(link.source, api)})
        return out

    def all_fields_json(self, issue: Issue, api: int = 3) -> dict[str, Any]:
        f = issue.fields
        out: dict[str, Any] = {
            "summary": f["summary"],
            "description": f.get("description") if api == 3 else (adf_to_text(f.get("description")) or None),
            "status": self.status_json(f["status"], api),
            "priority": self.named_json("priority", f.get("priority"), api),
            "issuetype": self.named_json("issuetype", f["issuetype"], api),
            "project": {"self": f"{self.base_url}/rest/api/{api}/project/{self.projects[issue.project]['id']}",
                        **self.projects[issue.project]},
            "labels": list(f.get("labels") or []),
            "components": [{"self": f"{self.base_url}/rest/api/{api}/component/{self.ensure_component(issue.project, n)}",
                            "id": self.ensure_component(issue.project, n), "name": n} for n in f.get("components") or []],
            "created": fmt_ts(f["created"]),
            "updated": fmt_ts(f["updated"]),
            "resolution": self.named_json("resolution", f.get("resolution"), api),
            "resolutiondate": fmt_ts(f["resolutiondate"]) if f.get("resolutiondate") else None,
            "duedate": f.get("duedate"),
            "environment": f.get("environment"),
            "reporter": self.user_json(f.get("reporter"), api),
            "creator": self.user_json(f.get("reporter"), api),
            "assignee": self.user_json(f.get("assignee"), api),
            "issuelinks": self.links_json(issue, api),
            "subtasks": [],
            "fixVersions": [],
            "versions": [],
            "watches": {"self": f"{self.base_url}/rest/api/{api}/issue/{issue.key}/watchers", "watchCount": 1, "isWatching": False},
            "votes": {"self": f"{self.base_url}/rest/api/{api}/issue/{issue.key}/votes", "votes": 0, "hasVoted": False},
        }
        for fid in self.custom_fields:
            out[fid] = f.get(fid)
        if api == 3:
            comments = [self.comment_json(issue, c, api) for c in issue.comments]
            out["comment"] = {"comments": comments, "self": f"{self.base_url}/rest/api/3/issue/{issue.id}/comment",
                              "maxResults": len(comments), "total": len(comments), "startAt": 0}
        return out

    def select_fields(self, requested: list[str] | None, default_all: bool) -> tuple[bool, set[str], set[str]]:
        """(all?, included, excluded) from a Jira `fields` parameter."""
        if requested is None:
            return (default_all, set(), set())
        include, exclude, everything = set(), set(), False
        for item in requested:
            item = item.strip()
            if not item:
                continue
            if item in ("*all", "*navigable"):
                everything = True
            elif item.startswith("-"):
                exclude.add(item[1:])
            else:
                include.add(self.custom_field_by_name(item) or item)
        return everything, include, exclude

    def issue_json(self, issue: Issue, requested: list[str] | None = None, *, default_all: bool = True,
                   expand: str = "", api: int = 3) -> dict[str, Any]:
        """The REST representation of an issue with the requested fields."""
        everything, include, exclude = self.select_fields(requested, default_all)
        out: dict[str, Any] = {"expand": "renderedFields,names,schema,operations,editmeta,changelog,versionedRepresentations",
                               "id": str(issue.id), "self": f"{self.base_url}/rest/api/{api}/issue/{issue.id}", "key": issue.key}
        if everything or include:
            full = self.all_fields_json(issue, api)
            keep = set(full) if everything else include
            out["fields"] = {k: v for k, v in full.items() if k in keep and k not in exclude}
        elif requested is not None:
            out["fields"] = {}
        if "changelog" in expand:
            out["changelog"] = {"startAt": 0, "maxResults": len(issue.history), "total": len(issue.history),
                                "histories": [{**h, "author": self.user_json(h["author"], api), "created": fmt_ts(h["created"])}
                                              for h in issue.history]}
        if "names" in expand:
            out["names"] = {fid: name for fid, (name, _, _) in self.custom_fields.items()}
        return out


class SiteResolver:
    """Answers the JQL evaluator's questions about this site's issues."""

    def __init__(self, site: JiraSite) -> None:
        self.site = site
        self._now = now_utc()

    def _canon(self, name: str) -> str:
        low = name.lower()
        if low in SYSTEM_FIELDS:
            return low
        return self.site.custom_field_by_name(name) or low

    def field_kind(self, field: str) -> str | None:
        name = self._canon(field)
        if name in SYSTEM_FIELDS:
            return SYSTEM_FIELDS[name]
        if name in self.site.custom_fields:
            return self.site.custom_fields[name][1]
        return None

    def values(self, issue: Issue, field: str) -> list[str]:
        name = self._canon(field)
        f = issue.fields
        site = self.site
        if name == "project":
            p = site.projects[issue.project]
            return [p["key"], p["name"], p["id"]]
        if name in ("key", "issuekey"):
            return [issue.key, str(issue.id)]
        if name == "id":
            return [str(issue.id)]
        if name == "status":
            return [f["status"], STATUSES[f["status"]][0]]
        if name == "statuscategory":
            c = STATUS_CATEGORIES[STATUSES[f["status"]][1]]
            return [c["name"], c["key"], str(c["id"])]
        if name == "priority":
            return [f["priority"], PRIORITIES[f["priority"]][0]] if f.get("priority") else []
        if name in ("issuetype", "type"):
            return [f["issuetype"], ISSUE_TYPES[f["issuetype"]]]
        if name == "labels":
            return list(f.get("labels") or [])
        if name in ("component", "components"):
            return list(f.get("components") or [])
        if name == "resolution":
            r = f.get("resolution")
            return [r, RESOLUTIONS.get(r, "")] if r else []
        if name in ("assignee", "reporter", "creator"):
            acc = f.get("reporter" if name == "creator" else name)
            if not acc:
                return []
            u = site.users.get(acc, {})
            return [v for v in (acc, u.get("displayName"), u.get("emailAddress")) if v]
        if name == "issuelinktype":
            out = []
            for link in site.links:
                if link.source == issue.key:
                    out += [link.type["outward"], link.type["name"]]
                elif link.dest == issue.key:
                    out += [link.type["inward"], link.type["name"]]
            return out
        return _custom_values(f.get(name))

    def text(self, issue: Issue, field: str) -> str:
        name = self._canon(field)
        f = issue.fields
        if name == "summary":
            return str(f["summary"])
        if name == "description":
            return adf_to_text(f.get("description"))
        if name == "environment":
            return str(f.get("environment") or "")
        if name == "comment":
            return "\n".join(adf_to_text(c.body) for c in issue.comments)
        return "\n".join([str(f["summary"]), adf_to_text(f.get("description")), str(f.get("environment") or ""),
                          *(adf_to_text(c.body) for c in issue.comments)])

    def date(self, issue: Issue, field: str) -> datetime | None:
        name = self._canon(field)
        key = {"createddate": "created", "updateddate": "updated", "resolved": "resolutiondate", "due": "duedate"}.get(name, name)
        value = issue.fields.get(key)
        if value is None or value == "":
            return None
        return value if isinstance(value, datetime) else parse_ts(value)

    def number(self, issue: Issue, field: str) -> float | None:
        name = self._canon(field)
        if name == "id":
            return float(issue.id)
        value = issue.fields.get(name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def check_value(self, field: str, value: str) -> None:
        name = self._canon(field)
        if name == "project" and not any(value.lower() in (p["key"].lower(), p["name"].lower(), p["id"])
                                          for p in self.site.projects.values()):
            raise jira_jql.JqlError(f"The value '{value}' does not exist for the field 'project'.")
        if name == "status" and value.lower() not in {s.lower() for s in STATUSES} | {v[0] for v in STATUSES.values()}:
            raise jira_jql.JqlError(f"The value '{value}' does not exist for the field 'status'.")
        if name == "priority" and value.lower() not in {p.lower() for p in PRIORITIES} | {v[0] for v in PRIORITIES.values()}:
            raise jira_jql.JqlError(f"The value '{value}' does not exist for the field 'priority'.")
        if name in ("issuetype", "type") and value.lower() not in {t.lower() for t in ISSUE_TYPES} | set(ISSUE_TYPES.values()):
            raise jira_jql.JqlError(f"The value '{value}' does not exist for the field 'issuetype'.")

    def current_user(self) -> list[str]:
        return [self.site.bot]

    def now(self) -> datetime:
        return self._now

    def sort_key(self, issue: Issue, field: str) -> Any:
        name = self._canon(field)
        f = issue.fields
        if name == "id":
            return issue.id
        if name in ("key", "issuekey"):
            return (issue.project, int(issue.key.rsplit("-", 1)[1]))
        if name == "priority":
            return PRIORITIES[f["priority"]][1] if f.get("priority") else None
        if name == "status":
            return f["status"]
        if name == "summary":
            return str(f["summary"]).lower()
        if self.field_kind(field) == "date":
            return self.date(issue, field)
        if name in ("assignee", "reporter"):
            u = self.site.users.get(f.get(name) or "")
            return u["displayName"].lower() if u else None
        vals = self.values(issue, field)
        return vals[0].lower() if vals else None


def _custom_values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [s for v in value for s in _custom_values(v)]
    if isinstance(value, dict):
        return [str(value[k]) for k in ("value", "name", "key", "id") if k in value]
    return [str(value)]
