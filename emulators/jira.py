"""Jira Cloud REST v3 emulator (subset) with Basic auth, fault injection and a webhook sender.

Endpoints: `GET/PUT /rest/api/3/issue/{key}`, `POST /rest/api/3/issue`, `GET/POST .../issue/{key}/comment`,
`GET/POST .../issue/{key}/transitions`, `GET /rest/api/3/issueLinkType`, `POST /rest/api/3/issueLink`,
`GET/POST /rest/api/3/search/jql` (`nextPageToken` paging), `POST /rest/api/3/search/approximate-count`,
legacy `/rest/api/3/search` → 410, `GET /rest/api/3/field`, `/myself`, `/serverInfo`, `/project/{key}`.

Issue links follow Jira's (counter-intuitive) POST semantics: `{"type": {"name": "Blocks"},
"inwardIssue": {"key": "A"}, "outwardIssue": {"key": "B"}}` means **A blocks B**; A's `issuelinks` then show
`outwardIssue: B` and B's show `inwardIssue: A`. To mark NEW as a duplicate of OLD: inwardIssue NEW,
outwardIssue OLD ("NEW duplicates OLD").

Adding a comment fires `comment_created` and also `jira:issue_updated` with
`issue_event_type_name: "issue_commented"` (as Jira Cloud does) to webhooks subscribed to each.

Control API: `POST /_emulator/jira/issues`, `GET /_emulator/jira/state`, `POST|GET|DELETE /_emulator/jira/webhooks`,
`POST /_emulator/jira/webhooks/redeliver`, `POST|DELETE /_emulator/jira/faults`, `POST /_emulator/jira/fields`,
`POST /_emulator/reset`.
"""
from __future__ import annotations

import base64
import hmac
import json
from datetime import datetime, timedelta
from typing import Any, Callable

from flask import Flask, Response, jsonify, request

from emulators import jira_jql
from emulators.common import FaultInjector, add_control_routes, add_control_error_handler, apply_fault, control_json
from emulators.jira_model import (ISSUE_TYPES, PRIORITIES, RESOLUTIONS, STATUSES, TRANSITIONS, EDITABLE, LINK_TYPES,
                                  Comment, Issue, JiraSite, Link, SiteResolver, adf_error, adf_to_text, fmt_ts,
                                  now_utc, parse_ts, text_to_adf)
from emulators.jira_webhooks import WebhookHub

LEGACY_SEARCH_GONE = ("The requested API has been removed. Please migrate to the /rest/api/3/search/jql API. "
                      "A full migration guideline is available at https://developer.atlassian.com/changelog/#CHANGE-2046")
MAX_PAGE_FULL = 100
MAX_PAGE_IDS = 5000


class JiraError(Exception):
    """An error answered in Jira's `{"errorMessages": [...], "errors": {...}}` shape."""

    def __init__(self, status: int, messages: list[str] | None = None, errors: dict[str, str] | None = None) -> None:
        super().__init__("; ".join(messages or []) or json.dumps(errors))
        self.status = status
        self.messages = messages or []
        self.errors = errors or {}


Event = tuple[str, Issue | None, Callable[[], dict[str, Any]]]


class JiraService:
    """Operations on the site; each returns the webhook events it caused (fired after the lock is released)."""

    def __init__(self, site: JiraSite, hub: WebhookHub) -> None:
        self.site = site
        self.hub = hub

    # ------------------------------------------------------------ helpers

    def get(self, key_or_id: str) -> Issue:
        site = self.site
        issue = site.issues.get(key_or_id.upper()) or (site.by_id.get(int(key_or_id)) if key_or_id.isdigit() else None)
        if issue is None:
            raise JiraError(404, ["Issue does not exist or you do not have permission to see it."])
        return issue

    def _history(self, issue: Issue, items: list[dict[str, Any]], author: str | None = None) -> dict[str, Any]:
        site = self.site
        entry = {"id": str(site.next_history_id), "author": author or site.bot, "created": now_utc(), "items": items}
        site.next_history_id += 1
        issue.history.append(entry)
        return entry

    def _webhook_issue(self, issue: Issue) -> dict[str, Any]:
        return self.site.issue_json(issue, ["*all"], api=2)

    def _issue_event(self, event: str, type_name: str, issue: Issue, changelog: dict[str, Any] | None = None,
                     comment: Comment | None = None) -> Event:
        site = self.site

        def body() -> dict[str, Any]:
            out: dict[str, Any] = {"timestamp": int(now_utc().timestamp() * 1000), "webhookEvent": event,
                                   "issue_event_type_name": type_name, "user": site.user_json(site.bot, 2),
                                   "issue": self._webhook_issue(issue)}
            if changelog is not None:
                out["changelog"] = {"id": changelog["id"], "items": changelog["items"]}
            if comment is not None:
                out["comment"] = site.comment_json(issue, comment, 2)
            return out

        return (event, issue, body)

    def _comment_event(self, issue: Issue, comment: Comment) -> Event:
        site = self.site

        def body() -> dict[str, Any]:
            fields = site.all_fields_json(issue, 2)
            keep = ("summary", "status", "priority", "assignee", "issuetype", "project")
            return {"timestamp": int(now_utc().timestamp() * 1000), "webhookEvent": "comment_created",
                    "comment": site.comment_json(issue, comment, 2),
                    "issue": {"id": str(issue.id), "self": f"{site.base_url}/rest/api/2/issue/{issue.id}", "key": issue.key,
                              "fields": {k: fields[k] for k in keep}}}

        return ("comment_created", issue, body)

    # ------------------------------------------------------------ field parsing

    def _named(self, field: str, value: Any, allowed: dict[str, Any]) -> str:
        name = value.get("name") if isinstance(value, dict) else value
        ident = value.get("id") if isinstance(value, dict) else None
        for n, v in allowed.items():
            vid = v[0] if isinstance(v, tuple) else v
            if (name and str(name).lower() == n.lower()) or (ident and str(ident) == vid):
                return n
        messages = {"priority": "Specify a valid priority", "issuetype": "The issue type selected is invalid.",
                    "resolution": "Specify a valid resolution"}
        raise JiraError(400, errors={field: messages.get(field, f"Specify a valid value for {field}")})

    def _user(self, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, dict):
            ident = value.get("accountId") or value.get("emailAddress") or value.get("name")
        else:
            ident = value
        if not ident:
            return None
        return self.site.ensure_user(str(ident))

    def _labels(self, labels: Any) -> list[str]:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise JiraError(400, errors={"labels": "Labels must be a list of strings."})
        for label in labels:
            if not label or any(c.isspace() for c in label) or len(label) > 255:
                raise JiraError(400, errors={"labels": f"The label '{label}' contains spaces which is invalid."})
        return list(dict.fromkeys(labels))

    def _components(self, project: str, comps: Any) -> list[str]:
        if not isinstance(comps, list):
            raise JiraError(400, errors={"components": "Components must be a list."})
        out = []
        for c in comps:
            name = c.get("name") if isinstance(c, dict) else c
            if isinstance(c, dict) and not name and c.get("id"):
                name = next((n for (p, n), cid in self.site.components.items() if cid == str(c["id"]) and p == project), None)
            if not name:
                raise JiraError(400, errors={"components": "Component name or id is not valid."})
            self.site.ensure_component(project, str(name))
            out.append(str(name))
        return out

    def _set_field(self, issue_fields: dict[str, Any], project: str, name: str, value: Any, *, rest: bool) -> None:
        site = self.site
        if name == "summary":
            if not isinstance(value, str) or not value.strip():
                raise JiraError(400, errors={"summary": "You must specify a summary of the issue."})
            if len(value) > 255:
                raise JiraError(400, errors={"summary": "Summary must be less than 255 characters."})
            issue_fields["summary"] = value
        elif name == "description":
            if value is None:
                issue_fields["description"] = None
            elif isinstance(value, str) and not rest:
                issue_fields["description"] = text_to_adf(value)
            else:
                err = adf_error(value)
                if err:
                    raise JiraError(400, errors={"description": err})
                issue_fields["description"] = value
        elif name == "environment":
            issue_fields["environment"] = adf_to_text(value) if isinstance(value, dict) else value
        elif name == "priority":
            issue_fields["priority"] = self._named("priority", value, PRIORITIES) if value is not None else None
        elif name == "issuetype":
            issue_fields["issuetype"] = self._named("issuetype", value, ISSUE_TYPES)
        elif name == "labels":
            issue_fields["labels"] = self._labels(value)
        elif name == "components":
            issue_fields["components"] = self._components(project, value)
        elif name in ("assignee", "reporter"):
            issue_fields[name] = self._user(value)
        elif name == "duedate":
            issue_fields["duedate"] = value
        elif name.startswith("customfield_"):
            if name not in site.custom_fields:
                if rest:
                    raise JiraError(400, errors={name: f"Field '{name}' cannot be set. It is not on the appropriate screen, or unknown."})
                site.custom_fields[name] = (name, "value", "any")
            issue_fields[name] = value
        else:
            raise JiraError(400, errors={name: f"Field '{name}' cannot be set. It is not on the appropriate screen, or unknown."})

    # ------------------------------------------------------------ operations

    def create(self, fields: dict[str, Any], *, rest: bool = True, key: str | None = None,
               extra: dict[str, Any] | None = None) -> tuple[Issue, list[Event]]:
        """Create an issue from REST `fields` (or the seed form when rest=False)."""
        site = self.site
        errors: dict[str, str] = {}
        proj = fields.get("project")
        pkey = (proj.get("key") or proj.get("id")) if isinstance(proj, dict) else proj
        project = None
        if pkey:
            project = next((p for p in site.projects.values() if str(pkey).upper() in (p["key"], p["id"])), None)
            if project is None and not rest:
                project = site.ensure_project(str(pkey))
        if project is None:
            errors["project"] = "Specify a valid project ID or key"
        if not isinstance(fields.get("summary"), str) or not fields["summary"].strip():
            errors["summary"] = "You must specify a summary of the issue."
        if not fields.get("issuetype"):
            if rest:
                errors["issuetype"] = "Specify an issue type"
        if errors:
            raise JiraError(400, errors=errors)
        assert project is not None
        pk = project["key"]
        now = now_utc()
        f: dict[str, Any] = {"status": "To Do", "priority": "Medium", "issuetype": "Task", "labels": [],
                             "components": [], "created": now, "updated": now, "resolution": None,
                             "resolutiondate": None, "reporter": site.bot, "assignee": None, "description": None}
        for name, value in fields.items():
            if name == "project":
                continue
            self._set_field(f, pk, name, value, rest=rest)
        for name, value in (extra or {}).items():  # seed-only fields: status, dates, resolution
            if name == "status":
                if value not in STATUSES:
                    raise ValueError(f"unknown status {value!r}; known: {list(STATUSES)}")
                f["status"] = value
            elif name in ("created", "updated", "resolutiondate"):
                f[name] = parse_ts(value) if value else None
            elif name == "resolution":
                f["resolution"] = self._named("resolution", value, RESOLUTIONS) if value else None
        if STATUSES[f["status"]][1] == "done" and not f.get("resolution"):
            f["resolution"] = "Done"
        if f.get("resolution") and not f.get("resolutiondate"):
            f["resolutiondate"] = f["updated"]
        if key:
            key = key.upper()
            if key in site.issues:
                raise ValueError(f"issue {key} already exists")
            prefix, _, num = key.rpartition("-")
            if prefix != pk or not num.isdigit():
                raise ValueError(f"key {key} does not belong to project {pk}")
            site.counters[pk] = max(site.counters.get(pk, 0), int(num))
        else:
            site.counters[pk] = site.counters.get(pk, 0) + 1
            key = f"{pk}-{site.counters[pk]}"
        issue = Issue(site.next_issue_id, key, pk, f)
        site.next_issue_id += 1
        site.issues[key] = issue
        site.by_id[issue.id] = issue
        site.touch()
        items = [{"field": n, "fieldtype": "jira", "fieldId": n, "from": None, "fromString": None, "to": None,
                  "toString": adf_to_text(f.get(n)) if n == "description" else str(f.get(n))}
                 for n in ("summary", "description", "priority", "status") if f.get(n)]
        changelog = {"id": str(site.next_history_id), "items": items}
        site.next_history_id += 1
        return issue, [self._issue_event("jira:issue_created", "issue_created", issue, changelog)]

    def update(self, issue: Issue, body: dict[str, Any]) -> list[Event]:
        """PUT /issue: `fields` replace values, `update` applies add / remove / set operations."""
        fields = body.get("fields") or {}
        update = body.get("update") or {}
        if not isinstance(fields, dict) or not isinstance(update, dict):
            raise JiraError(400, ["Invalid request payload. Refer to the REST API documentation and try again."])
        for name in list(fields) + list(update):
            if name not in EDITABLE and not name.startswith("customfield_") and name != "comment":
                raise JiraError(400, errors={name: f"Field '{name}' cannot be set. It is not on the appropriate screen, or unknown."})
        before = {k: (list(v) if isinstance(v, list) else v) for k, v in issue.fields.items()}
        staged = dict(issue.fields)
        for name, value in fields.items():
            self._set_field(staged, issue.project, name, value, rest=True)
        new_comments: list[dict[str, Any]] = []
        for name, ops in update.items():
            if not isinstance(ops, list):
                raise JiraError(400, errors={name: "Update operations must be a list."})
            for op in ops:
                if not isinstance(op, dict) or len(op) != 1:
                    raise JiraError(400, errors={name: "Each update operation must have exactly one of add, set, remove, edit."})
                verb, value = next(iter(op.items()))
                if name == "comment":
                    if verb != "add" or not isinstance(value, dict):
                        raise JiraError(400, errors={"comment": "Only 'add' is supported for comments."})
                    new_comments.append(value)
                elif name in ("labels", "components"):
                    current = list(staged.get(name) or [])
                    vals = self._labels([value]) if name == "labels" and verb != "set" else value
                    if verb == "add":
                        item = vals[0] if name == "labels" else self._components(issue.project, [value])[0]
                        if item not in current:
                            current.append(item)
                    elif verb == "remove":
                        item = value if name == "labels" else (value.get("name") if isinstance(value, dict) else value)
                        current = [c for c in current if c != item]
                    elif verb == "set":
                        current = self._labels(value) if name == "labels" else self._components(issue.project, value)
                    else:
                        raise JiraError(400, errors={name: f"Operation '{verb}' is not supported for {name}."})
                    staged[name] = current
                elif verb == "set":
                    self._set_field(staged, issue.project, name, value, rest=True)
                else:
                    raise JiraError(400, errors={name: f"Operation '{verb}' is not supported for {name}."})
        comments = [self._parse_comment(c) for c in new_comments]  # validate everything before writing
        site = self.site
        items = []
        for name in sorted(set(staged) | set(before)):
            if staged.get(name) != before.get(name):
                old, new = before.get(name), staged.get(name)
                items.append({"field": name, "fieldtype": "custom" if name.startswith("customfield_") else "jira",
                              "fieldId": name, "from": None, "to": None,
                              "fromString": _changelog_str(old), "toString": _changelog_str(new)})
        events: list[Event] = []
        if items:
            staged["updated"] = now_utc()
            issue.fields = staged
            changelog = self._history(issue, items)
            site.touch()
            events.append(self._issue_event("jira:issue_updated", "issue_updated", issue, changelog))
        for body_adf, visibility in comments:
            events += self._add_comment(issue, body_adf, visibility)[1]
        return events

    def _parse_comment(self, payload: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if not isinstance(payload, dict) or "body" not in payload:
            raise JiraError(400, errors={"comment": "Comment body can not be empty!"})
        body = payload["body"]
        if adf_error(body):
            raise JiraError(400, errors={"comment": "Comment body is not valid!"})
        if not adf_to_text(body).strip():
            raise JiraError(400, errors={"comment": "Comment body can not be empty!"})
        vis = payload.get("visibility")
        return body, vis if isinstance(vis, dict) else None

    def _add_comment(self, issue: Issue, body: dict[str, Any], visibility: dict[str, Any] | None,
                     author: str | None = None, created: datetime | None = None) -> tuple[Comment, list[Event]]:
        site = self.site
        when = created or now_utc()
        comment = Comment(site.next_comment_id, author or site.bot, body, when, when, visibility)
        site.next_comment_id += 1
        issue.comments.append(comment)
        if created is None:
            issue.fields["updated"] = when
        site.touch()
        return comment, [self._comment_event(issue, comment),
                         self._issue_event("jira:issue_updated", "issue_commented", issue, None, comment)]

    def add_comment(self, issue: Issue, payload: Any) -> tuple[Comment, list[Event]]:
        body, vis = self._parse_comment(payload)
        return self._add_comment(issue, body, vis)

    def transition(self, issue: Issue, body: dict[str, Any]) -> list[Event]:
        t = body.get("transition")
        if not isinstance(t, dict) or not (t.get("id") or t.get("name")):
            raise JiraError(400, errors={"transition": "Transition id or name must be specified."})
        tid = str(t.get("id") or "")
        if not tid:
            tid = next((i for i, (n, _) in TRANSITIONS.items() if n.lower() == str(t["name"]).lower()), "")
        if tid not in TRANSITIONS or TRANSITIONS[tid][1] == issue.fields["status"]:
            raise JiraError(400, [f"Transition id '{tid}' is not valid for this issue."])
        target = TRANSITIONS[tid][1]
        fields = body.get("fields") or {}
        resolution = None
        if STATUSES[target][1] == "done":
            resolution = self._named("resolution", fields.get("resolution") or "Done", RESOLUTIONS)
        comments = [self._parse_comment(op["add"]) for op in (body.get("update") or {}).get("comment", []) if isinstance(op, dict) and "add" in op]
        site = self.site
        old_status, old_res = issue.fields["status"], issue.fields.get("resolution")
        now = now_utc()
        issue.fields["status"] = target
        issue.fields["resolution"] = resolution
        issue.fields["resolutiondate"] = now if resolution else None
        issue.fields["updated"] = now
        items = [{"field": "status", "fieldtype": "jira", "fieldId": "status", "from": STATUSES[old_status][0],
                  "fromString": old_status, "to": STATUSES[target][0], "toString": target}]
        if old_res != resolution:
            items.append({"field": "resolution", "fieldtype": "jira", "fieldId": "resolution", "from": None,
                          "fromString": old_res, "to": None, "toString": resolution})
        changelog = self._history(issue, items)
        site.touch()
        events = [self._issue_event("jira:issue_updated", "issue_generic", issue, changelog)]
        for body_adf, vis in comments:
            events += self._add_comment(issue, body_adf, vis)[1]
        return events

    def link(self, body: dict[str, Any]) -> list[Event]:
        site = self.site
        t = body.get("type")
        inward = (body.get("inwardIssue") or {}).get("key") or (body.get("inwardIssue") or {}).get("id")
        outward = (body.get("outwardIssue") or {}).get("key") or (body.get("outwardIssue") or {}).get("id")
        if not isinstance(t, dict) or not (t.get("name") or t.get("id")):
            raise JiraError(400, errors={"issueLinkType": "Issue link type is required."})
        if not inward or not outward:
            raise JiraError(400, errors={"issueLinks": "Both inwardIssue and outwardIssue are required."})
        lt = site.link_type(t.get("name"), t.get("id"))
        if lt is None:
            raise JiraError(404, [f"No issue link type with name '{t.get('name') or t.get('id')}' found."])
        src, dst = self.get(str(inward)), self.get(str(outward))
        if src.key == dst.key:
            raise JiraError(400, ["You cannot link an issue to itself."])
        comment = None
        if body.get("comment") is not None:
            comment = self._parse_comment(body["comment"])
        if any(lk.type["id"] == lt["id"] and lk.source == src.key and lk.dest == dst.key for lk in site.links):
            return []  # Jira answers 201 and keeps one link
        link = Link(site.next_link_id, dict(lt), src.key, dst.key)
        site.next_link_id += 1
        site.links.append(link)
        now = now_utc()
        src.fields["updated"] = dst.fields["updated"] = now
        site.touch()

        def body_fn() -> dict[str, Any]:
            return {"timestamp": int(now.timestamp() * 1000), "webhookEvent": "issuelink_created",
                    "issueLink": {"id": link.id, "sourceIssueId": src.id, "destinationIssueId": dst.id,
                                  "issueLinkType": {"id": int(lt["id"]), "name": lt["name"], "outwardName": lt["outward"],
                                                    "inwardName": lt["inward"], "isSubTaskLinkType": False, "isSystemLinkType": False}}}

        events: list[Event] = [("issuelink_created", src, body_fn)]
        if comment is not None:
            # Atlassian: "the comment is added to the from (outward) issue" — the link's source.
            events += self._add_comment(src, comment[0], comment[1])[1]
        return events

    def search(self, jql: str, fields: list[str] | None, max_results: Any, token: str | None,
               expand: str = "") -> dict[str, Any]:
        site = self.site
        try:
            max_results = int(max_results) if max_results is not None else 50
        except (TypeError, ValueError):
            raise JiraError(400, ["The value of 'maxResults' must be an integer."]) from None
        if max_results < 0:
            raise JiraError(400, ["The value of 'maxResults' must be a non-negative integer."])
        keys = self.matching_keys(jql)
        offset = 0
        if token:
            try:
                data = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
                offset = int(data["o"])
                if data["q"] != _qhash(jql) or offset < 0:
                    raise ValueError
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise JiraError(400, ["The provided next page token is invalid or expired."]) from None
        ids_only = fields is not None and all(f.strip() in ("id", "key") for f in fields)
        page_size = min(max_results, MAX_PAGE_IDS if ids_only or fields is None else MAX_PAGE_FULL)
        page = keys[offset: offset + page_size]
        issues = []
        for k in page:
            rendered = site.issue_json(site.issues[k], fields, default_all=False, expand=expand)
            if fields is None:
                rendered = {"id": rendered["id"]}  # search/jql returns ids only unless fields are asked for
            issues.append(rendered)
        out: dict[str, Any] = {"issues": issues}
        nxt = offset + len(page)
        if nxt < len(keys) and page_size > 0:
            out["nextPageToken"] = base64.urlsafe_b64encode(json.dumps({"q": _qhash(jql), "o": nxt}).encode()).decode().rstrip("=")
            out["isLast"] = False
        else:
            out["isLast"] = True
        return out

    def matching_keys(self, jql: str) -> list[str]:
        site = self.site
        cache_key = (jql, site.version)
        cached = site.search_cache.get(cache_key)
        if cached is not None:
            return cached
        try:
            q = jira_jql.parse(jql)
            resolver = SiteResolver(site)
            pred = jira_jql.compile_query(q, resolver)
            matched = [i for i in site.issues.values() if pred(i)]
            ordered = jira_jql.sort_issues(matched, q, resolver)
        except jira_jql.JqlError as exc:
            raise JiraError(400, [str(exc)]) from None
        keys = [i.key for i in ordered]
        if len(site.search_cache) > 64:
            site.search_cache.clear()
        site.search_cache[cache_key] = keys
        return keys

    def issue_matches(self, issue: Issue, jql: str) -> bool:
        try:
            q = jira_jql.parse(jql)
            return bool(jira_jql.compile_query(q, SiteResolver(self.site))(issue))
        except jira_jql.JqlError:
            return False

    def seed(self, items: list[dict[str, Any]]) -> tuple[list[str], list[Event]]:
        """Bulk-create issues in the compact seed form (see README of this module)."""
        site = self.site
        created: list[Issue] = []
        events: list[Event] = []
        pending_links: list[tuple[str, dict[str, Any]]] = []
        for item in items:
            if not isinstance(item, dict):
                raise ValueError("each issue must be an object")
            key = item.get("key")
            project = item.get("project") or (str(key).rsplit("-", 1)[0] if key else None)
            if not project:
                raise ValueError("each issue needs 'project' or 'key'")
            if project.upper() not in site.projects:
                site.ensure_project(project, item.get("project_name"))
            fields: dict[str, Any] = {"project": {"key": project}, "summary": item.get("summary")}
            for name in ("description", "priority", "issuetype", "labels", "components", "assignee", "reporter",
                         "duedate", "environment"):
                if name in item:
                    fields[name] = item[name]
            if "client" in item:
                fields["customfield_10100"] = {"value": item["client"]} if item["client"] else None
            if item.get("flagged"):
                fields["customfield_10021"] = [{"value": "Impediment", "id": "10019"}]
            for name, value in (item.get("fields") or {}).items():
                fields[name] = value
            extra: dict[str, Any] = {k: item[k] for k in ("status", "created", "updated", "resolution", "resolutiondate")
                                     if k in item}
            if "created" in item and "updated" not in item:
                extra["updated"] = item["created"]
            issue, evs = self.create(fields, rest=False, key=key, extra=extra)
            created.append(issue)
            events += evs
            for c in item.get("comments") or []:
                if isinstance(c, str):
                    c = {"body": c}
                body = c.get("body")
                body = text_to_adf(body) if isinstance(body, str) else body
                if adf_error(body):
                    raise ValueError(f"comment on {issue.key} is neither text nor ADF")
                author = site.ensure_user(str(c["author"])) if c.get("author") else None
                self._add_comment(issue, body, None, author, parse_ts(c["created"]) if c.get("created") else issue.fields["created"])
            for link in item.get("links") or []:
                pending_links.append((issue.key, link))
        for key, link in pending_links:
            lt = site.link_type(link.get("type", "Relates"))
            if lt is None:
                raise ValueError(f"unknown link type {link.get('type')!r}")
            other = str(link.get("outward") or link.get("inward") or "").upper()
            if other not in site.issues:
                raise ValueError(f"link from {key} to unknown issue {other!r}")
            # {"type": "Blocks", "outward": "X"}: this issue blocks X; {"inward": "X"}: X blocks this issue.
            src, dst = (key, other) if link.get("outward") else (other, key)
            site.links.append(Link(site.next_link_id, dict(lt), src, dst))
            site.next_link_id += 1
        site.touch()
        return [i.key for i in created], events


def _qhash(jql: str) -> str:
    import hashlib
    return hashlib.sha256(jql.encode()).hexdigest()[:16]


def _changelog_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return adf_to_text(value) if value.get("type") == "doc" else str(value.get("value") or value.get("name") or value)
    if isinstance(value, datetime):
        return fmt_ts(value)
    return str(value)


def create_app(*, user: str, token: str, default_secret: str | None = None) -> tuple[Flask, JiraSite]:
    """The Flask app of the Jira emulator; Basic auth with `user:token`."""
    app = Flask("emulators.jira")
    site = JiraSite(user)
    hub = WebhookHub(default_secret)
    svc = JiraService(site, hub)
    faults = FaultInjector()
    expected = base64.b64encode(f"{user}:{token}".encode()).decode()
    add_control_error_handler(app)
    app.config["jira_site"] = site
    app.config["jira_hub"] = hub

    def jira_error(status: int, messages: list[str] | None = None, errors: dict[str, str] | None = None) -> Response:
        resp = jsonify({"errorMessages": messages or [], "errors": errors or {}})
        resp.status_code = status
        return resp

    @app.errorhandler(JiraError)
    def _jira_error(exc: JiraError) -> Response:
        return jira_error(exc.status, exc.messages, exc.errors)

    @app.errorhandler(404)
    def _not_found(_: Exception) -> Response:
        return jira_error(404, ["null for uri: " + request.url])

    @app.errorhandler(405)
    def _not_allowed(_: Exception) -> Response:
        return jira_error(405, ["Method not allowed"])

    @app.before_request
    def gate() -> Response | None:
        if request.path.startswith("/_emulator/"):
            return None
        rule = faults.take(request.method, request.path)
        if rule is not None:
            default = {429: {"errorMessages": ["Rate limit exceeded."], "errors": {}},
                       503: {"errorMessages": ["Service Unavailable"], "errors": {}}}
            resp = apply_fault(rule, lambda s: default.get(s, {"errorMessages": ["Internal server error"], "errors": {}}))
            if rule.status == 429 and rule.retry_after is not None:
                reset = now_utc() + timedelta(seconds=float(rule.retry_after))
                resp.headers["X-RateLimit-Reset"] = reset.strftime("%Y-%m-%dT%H:%MZ")
            return resp
        auth = request.headers.get("Authorization", "")
        if not (auth.startswith("Basic ") and hmac.compare_digest(auth[6:].strip().encode(), expected.encode())):
            resp = jira_error(401, ["Client must be authenticated to access this resource."])
            resp.headers["WWW-Authenticate"] = 'Basic realm="protected-area"'
            return resp
        return None

    def fire(events: list[Event]) -> None:
        """Deliver webhook events (outside the site lock: receivers may call us back)."""
        for event, issue, body_fn in events:
            with site.lock:
                targets = hub.targets(event, lambda jql: issue is not None and svc.issue_matches(issue, jql))
                body = body_fn() if targets else None
            for hook in targets:
                assert body is not None
                hub.send(hook, event, body)

    def json_body() -> dict[str, Any]:
        body = request.get_json(silent=True, force=True)
        if not isinstance(body, dict):
            raise JiraError(400, ["Invalid request payload. Refer to the REST API documentation and try again."])
        return body

    def fields_param(value: Any) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str):
            return [v for v in value.split(",")]
        if isinstance(value, list):
            return [str(v) for v in value]
        raise JiraError(400, ["'fields' must be a list of field names."])

    # ------------------------------------------------------------ REST

    @app.get("/rest/api/3/issue/<key>")
    def get_issue(key: str) -> Response:
        with site.lock:
            issue = svc.get(key)
            return jsonify(site.issue_json(issue, fields_param(request.args.get("fields")),
                                           expand=request.args.get("expand", "")))

    @app.post("/rest/api/3/issue")
    def create_issue() -> tuple[Response, int]:
        body = json_body()
        fields = body.get("fields")
        if not isinstance(fields, dict):
            raise JiraError(400, errors={"fields": "Field 'fields' is required."})
        with site.lock:
            issue, events = svc.create(fields)
            update = body.get("update") or {}
            if update:
                events += svc.update(issue, {"update": update})
            out = {"id": str(issue.id), "key": issue.key, "self": f"{site.base_url}/rest/api/3/issue/{issue.id}"}
        fire(events)
        return jsonify(out), 201

    @app.put("/rest/api/3/issue/<key>")
    def edit_issue(key: str) -> tuple[str, int]:
        body = json_body()
        with site.lock:
            events = svc.update(svc.get(key), body)
        fire(events)
        return "", 204

    @app.get("/rest/api/3/issue/<key>/comment")
    def list_comments(key: str) -> Response:
        with site.lock:
            issue = svc.get(key)
            start = max(int(request.args.get("startAt", 0)), 0)
            limit = min(max(int(request.args.get("maxResults", 5000)), 0), 5000)
            ordered = list(issue.comments)
            if request.args.get("orderBy", "created").lstrip("+") == "-created":
                ordered.reverse()
            page = ordered[start: start + limit]
            return jsonify({"startAt": start, "maxResults": limit, "total": len(issue.comments),
                            "comments": [site.comment_json(issue, c) for c in page]})

    @app.post("/rest/api/3/issue/<key>/comment")
    def add_comment(key: str) -> tuple[Response, int]:
        body = json_body()
        with site.lock:
            issue = svc.get(key)
            comment, events = svc.add_comment(issue, body)
            out = site.comment_json(issue, comment)
        fire(events)
        return jsonify(out), 201

    @app.get("/rest/api/3/issue/<key>/transitions")
    def list_transitions(key: str) -> Response:
        with site.lock:
            issue = svc.get(key)
            out = [{"id": tid, "name": name, "to": site.status_json(target), "hasScreen": False, "isGlobal": True,
                    "isInitial": False, "isAvailable": True, "isConditional": False, "isLooped": False}
                   for tid, (name, target) in TRANSITIONS.items() if target != issue.fields["status"]]
        return jsonify({"expand": "transitions", "transitions": out})

    @app.post("/rest/api/3/issue/<key>/transitions")
    def do_transition(key: str) -> tuple[str, int]:
        body = json_body()
        with site.lock:
            events = svc.transition(svc.get(key), body)
        fire(events)
        return "", 204

    @app.get("/rest/api/3/issueLinkType")
    def link_types() -> Response:
        return jsonify({"issueLinkTypes": [{**lt, "self": f"{site.base_url}/rest/api/3/issueLinkType/{lt['id']}"}
                                           for lt in LINK_TYPES]})

    @app.post("/rest/api/3/issueLink")
    def create_link() -> tuple[str, int]:
        body = json_body()
        with site.lock:
            events = svc.link(body)
        fire(events)
        return "", 201

    @app.route("/rest/api/3/search/jql", methods=["GET", "POST"])
    def search_jql() -> Response:
        if request.method == "POST":
            body = json_body()
            jql = body.get("jql", "")
            fields = fields_param(body.get("fields"))
            expand = body.get("expand", "")
            expand = ",".join(expand) if isinstance(expand, list) else str(expand or "")
            max_results, token = body.get("maxResults"), body.get("nextPageToken")
        else:
            jql = request.args.get("jql", "")
            fields = fields_param(request.args.get("fields"))
            expand = request.args.get("expand", "")
            max_results, token = request.args.get("maxResults"), request.args.get("nextPageToken")
        if not isinstance(jql, str):
            raise JiraError(400, ["The JQL query must be a string."])
        with site.lock:
            return jsonify(svc.search(jql, fields, max_results, token, expand))

    @app.post("/rest/api/3/search/approximate-count")
    def approximate_count() -> Response:
        body = json_body()
        with site.lock:
            return jsonify({"count": len(svc.matching_keys(str(body.get("jql", ""))))})

    @app.route("/rest/api/3/search", methods=["GET", "POST"])
    @app.route("/rest/api/2/search", methods=["GET", "POST"])
    def legacy_search() -> Response:
        return jira_error(410, [LEGACY_SEARCH_GONE])

    @app.get("/rest/api/3/field")
    def list_fields() -> Response:
        system = [{"id": f, "key": f, "name": f.title(), "custom": False, "orderable": True, "navigable": True,
                   "searchable": True, "clauseNames": [f]} for f in
                  ("summary", "description", "status", "priority", "issuetype", "project", "labels", "components",
                   "created", "updated", "resolution", "resolutiondate", "assignee", "reporter", "issuelinks", "comment", "duedate")]
        with site.lock:
            custom = [{"id": fid, "key": fid, "name": name, "custom": True, "orderable": True, "navigable": True,
                       "searchable": True, "clauseNames": [f"cf[{fid.split('_')[1]}]", name],
                       "schema": {"type": stype, "custom": "emulator", "customId": int(fid.split("_")[1])}}
                      for fid, (name, _, stype) in site.custom_fields.items()]
        return jsonify(system + custom)

    @app.get("/rest/api/3/myself")
    def myself() -> Response:
        with site.lock:
            return jsonify(site.user_json(site.bot))

    @app.get("/rest/api/3/serverInfo")
    def server_info() -> Response:
        return jsonify({"baseUrl": site.base_url, "version": "1001.0.0-SNAPSHOT", "versionNumbers": [1001, 0, 0],
                        "deploymentType": "Cloud", "buildNumber": 100281, "serverTitle": "Jira (emulator)",
                        "serverTime": fmt_ts(now_utc())})

    @app.get("/rest/api/3/project/<key>")
    def get_project(key: str) -> Response:
        with site.lock:
            p = next((p for p in site.projects.values() if key.upper() in (p["key"], p["id"])), None)
            if p is None:
                raise JiraError(404, ["No project could be found with key '%s'." % key])
            return jsonify({"self": f"{site.base_url}/rest/api/3/project/{p['id']}", **p})

    # ------------------------------------------------------------ control

    @app.post("/_emulator/jira/issues")
    def seed() -> Response:
        spec = control_json()
        items = spec.get("issues")
        if not isinstance(items, list):
            raise ValueError("'issues' must be a list")
        with site.lock:
            try:
                keys, events = svc.seed(items)
            except JiraError as exc:
                raise ValueError(f"invalid issue: {exc}") from None
        if spec.get("fire_webhooks"):
            fire(events)
        return jsonify({"keys": keys})

    @app.post("/_emulator/jira/fields")
    def add_field() -> Response:
        spec = control_json()
        fid, name = spec.get("id"), spec.get("name")
        if not (isinstance(fid, str) and fid.startswith("customfield_") and fid[12:].isdigit() and isinstance(name, str)):
            raise ValueError("need 'id' like customfield_10200 and a 'name'")
        kind = spec.get("kind", "value")
        if kind not in ("value", "text", "date", "number"):
            raise ValueError("'kind' must be value, text, date or number")
        with site.lock:
            site.custom_fields[fid] = (name, kind, spec.get("schema_type", "string"))
            site.touch()
        return jsonify({"ok": True})

    @app.get("/_emulator/jira/state")
    def state() -> Response:
        with site.lock:
            issues = {k: site.issue_json(i, ["*all"]) for k, i in site.issues.items()}
            links = [{"id": lk.id, "type": lk.type["name"], "inward": lk.source, "outward": lk.dest,
                      "description": f"{lk.source} {lk.type['outward']} {lk.dest}"} for lk in site.links]
            comments = {k: [{"id": str(c.id), "text": adf_to_text(c.body), "body": c.body, "author": c.author}
                            for c in i.comments] for k, i in site.issues.items()}
        with hub.lock:
            hooks = [h.public() for h in hub.hooks]
            deliveries = [d.public() for d in hub.deliveries]
        return jsonify({"issues": issues, "links": links, "comments": comments, "webhooks": hooks,
                        "deliveries": deliveries, "faults": faults.describe(), "projects": list(site.projects.values())})

    @app.post("/_emulator/jira/webhooks")
    def register_webhook() -> Response:
        return jsonify(hub.register(control_json()).public())

    @app.get("/_emulator/jira/webhooks")
    def list_webhooks() -> Response:
        with hub.lock:
            return jsonify({"webhooks": [h.public() for h in hub.hooks],
                            "deliveries": [d.public() for d in hub.deliveries], "idle": None})

    @app.delete("/_emulator/jira/webhooks")
    def clear_webhooks() -> Response:
        hub.reset()
        return jsonify({"ok": True})

    @app.post("/_emulator/jira/webhooks/redeliver")
    def redeliver() -> Response:
        spec = control_json()
        return jsonify(hub.redeliver(spec.get("identifier")).public())

    def reset_all() -> None:
        site.reset()
        hub.reset()

    add_control_routes(app, "jira", faults=faults, reset=reset_all)

    return app, site
