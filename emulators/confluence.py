"""Confluence Cloud read emulator: REST v2 pages and versions, v1 CQL content search (Basic auth).

`GET /wiki/api/v2/pages/{id}[?body-format=storage&version=N]`, `GET /wiki/api/v2/pages/{id}/versions`
(cursor paging, `_links.next`), `GET /wiki/api/v2/pages?space-id=&title=`, `GET /wiki/api/v2/spaces`,
`GET /wiki/rest/api/search?cql=...` (CQL subset: `type`, `space`, `title`, `text`, `id`, `label`,
`lastmodified`/`created` with `=`, `!=`, `~`, `IN`, date comparisons, AND / OR / NOT).
Control: `POST /_emulator/confluence/pages`, `POST /_emulator/confluence/pages/{id}/versions`,
`GET /_emulator/confluence/state`, faults at `/_emulator/confluence/faults`, `POST /_emulator/reset`.
"""
from __future__ import annotations

import base64
import hmac
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flask import Flask, Response, jsonify, request

from emulators import jira_jql
from emulators.common import FaultInjector, add_control_routes, add_control_error_handler, apply_fault, control_json
from emulators.jira_model import now_utc, parse_ts


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass
class Version:
    number: int
    body: str
    created: datetime
    author: str
    message: str = ""
    minor: bool = False


@dataclass
class Page:
    id: str
    title: str
    space: str
    parent_id: str | None
    labels: list[str]
    versions: list[Version] = field(default_factory=list)

    @property
    def current(self) -> Version:
        return self.versions[-1]


class ConfluenceSite:
    """Spaces and pages with full version history."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.base_url = "http://127.0.0.1"
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.spaces: dict[str, dict[str, Any]] = {}
            self.pages: dict[str, Page] = {}
            self.next_id = 65537

    def space(self, key: str, name: str | None = None) -> dict[str, Any]:
        if key not in self.spaces:
            self.spaces[key] = {"id": str(100000 + len(self.spaces)), "key": key, "name": name or key, "type": "global",
                                "status": "current"}
        return self.spaces[key]

    def add_page(self, spec: dict[str, Any]) -> Page:
        title, space_key = spec.get("title"), spec.get("space", "OPS")
        if not isinstance(title, str) or not title:
            raise ValueError("page needs a 'title'")
        self.space(str(space_key), spec.get("space_name"))
        pid = str(spec.get("id") or self.next_id)
        if pid in self.pages:
            raise ValueError(f"page {pid} exists")
        self.next_id = max(self.next_id, int(pid) + 1) if pid.isdigit() else self.next_id + 1
        page = Page(pid, title, str(space_key), spec.get("parent_id"), list(spec.get("labels") or []))
        versions = spec.get("versions") or [{"body": spec.get("body", ""), "created": spec.get("created"),
                                              "author": spec.get("author"), "message": spec.get("message", "")}]
        for v in versions:
            self.add_version(page, v)
        self.pages[pid] = page
        return page

    def add_version(self, page: Page, v: dict[str, Any]) -> Version:
        created = parse_ts(v["created"]) if v.get("created") else now_utc()
        ver = Version(len(page.versions) + 1, str(v.get("body", "")), created,
                      str(v.get("author") or "557058:emulator-author"), str(v.get("message", "")), bool(v.get("minor", False)))
        if "title" in v:
            page.title = str(v["title"])
        page.versions.append(ver)
        return ver

    def version_json(self, v: Version) -> dict[str, Any]:
        return {"number": v.number, "message": v.message, "minorEdit": v.minor, "authorId": v.author,
                "createdAt": iso(v.created)}

    def page_json(self, page: Page, body_format: str | None, version: int | None = None) -> dict[str, Any]:
        v = page.current if version is None else page.versions[version - 1]
        sp = self.spaces[page.space]
        out: dict[str, Any] = {"id": page.id, "status": "current", "title": page.title, "spaceId": sp["id"],
                               "parentId": page.parent_id, "parentType": "page" if page.parent_id else None,
                               "authorId": page.versions[0].author, "ownerId": page.versions[0].author,
                               "createdAt": iso(page.versions[0].created), "version": self.version_json(v),
                               "_links": {"webui": f"/spaces/{sp['key']}/pages/{page.id}", "editui": f"/pages/resumedraft.action?draftId={page.id}",
                                          "tinyui": f"/x/{page.id}", "base": self.base_url + "/wiki"}}
        if body_format in ("storage", "atlas_doc_format", "view"):
            out["body"] = {body_format: {"representation": body_format, "value": v.body}}
        return out


class _CqlResolver:
    def __init__(self, site: ConfluenceSite) -> None:
        self.site = site

    def field_kind(self, f: str) -> str | None:
        return {"type": "value", "space": "value", "id": "value", "label": "value", "title": "text", "text": "text",
                "lastmodified": "date", "created": "date", "ancestor": "value", "parent": "value"}.get(f.lower())

    def values(self, p: Page, f: str) -> list[str]:
        f = f.lower()
        if f == "type":
            return ["page"]
        if f == "space":
            return [p.space, self.site.spaces[p.space]["id"]]
        if f == "id":
            return [p.id]
        if f == "label":
            return list(p.labels)
        if f in ("ancestor", "parent"):
            return [p.parent_id] if p.parent_id else []
        return []

    def text(self, p: Page, f: str) -> str:
        body = re.sub(r"<[^>]+>", " ", p.current.body)
        return p.title if f.lower() == "title" else p.title + "\n" + body

    def date(self, p: Page, f: str) -> datetime | None:
        return p.current.created if f.lower() == "lastmodified" else p.versions[0].created

    def number(self, p: Page, f: str) -> float | None:
        return None

    def check_value(self, f: str, v: str) -> None:
        return None

    def current_user(self) -> list[str]:
        return []

    def now(self) -> datetime:
        return now_utc()

    def sort_key(self, p: Page, f: str) -> Any:
        f = f.lower()
        if f == "title":
            return p.title.lower()
        if f in ("lastmodified", "created"):
            return self.date(p, f)
        return int(p.id) if p.id.isdigit() else p.id


def create_app(*, user: str, token: str) -> tuple[Flask, ConfluenceSite]:
    """The Flask app of the Confluence emulator; Basic auth with the Atlassian `user:token`."""
    app = Flask("emulators.confluence")
    site = ConfluenceSite()
    faults = FaultInjector()
    expected = base64.b64encode(f"{user}:{token}".encode()).decode()
    add_control_error_handler(app)

    def err(status: int, message: str) -> Response:
        resp = jsonify({"errors": [{"status": status, "code": {400: "INVALID_REQUEST_PARAMETER", 401: "UNAUTHORIZED",
                                                               404: "NOT_FOUND"}.get(status, "ERROR"),
                                    "title": message, "detail": None}]})
        resp.status_code = status
        return resp

    @app.before_request
    def gate() -> Response | None:
        if request.path.startswith("/_emulator/"):
            return None
        rule = faults.take(request.method, request.path)
        if rule is not None:
            return apply_fault(rule, lambda s: {"errors": [{"status": s, "code": "ERROR", "title": "Injected fault"}]})
        auth = request.headers.get("Authorization", "")
        if not (auth.startswith("Basic ") and hmac.compare_digest(auth[6:].strip().encode(), expected.encode())):
            return err(401, "Unauthorized; scope does not match")
        return None

    def page_or_404(pid: str) -> Page:
        page = site.pages.get(pid)
        if page is None:
            raise LookupError(pid)
        return page

    @app.errorhandler(LookupError)
    def _missing(_: LookupError) -> Response:
        return err(404, "Not Found")

    @app.errorhandler(404)
    def _nf(_: Exception) -> Response:
        return err(404, "Not Found")

    @app.get("/wiki/api/v2/pages/<pid>")
    def get_page(pid: str) -> Response:
        with site.lock:
            page = page_or_404(pid)
            version = request.args.get("version")
            if version is not None and (not version.isdigit() or not 1 <= int(version) <= len(page.versions)):
                return err(400, "Invalid version")
            return jsonify(site.page_json(page, request.args.get("body-format"), int(version) if version else None))

    @app.get("/wiki/api/v2/pages/<pid>/versions")
    def versions(pid: str) -> Response:
        with site.lock:
            page = page_or_404(pid)
            try:
                limit = min(max(int(request.args.get("limit", 25)), 1), 250)
                start = int(base64.urlsafe_b64decode(request.args["cursor"] + "==").decode()) if request.args.get("cursor") else 0
            except (ValueError, UnicodeDecodeError):
                return err(400, "Invalid cursor or limit")
            ordered = list(page.versions)
            if request.args.get("sort", "-modified-date") == "-modified-date":
                ordered.reverse()
            chunk = ordered[start: start + limit]
            out: dict[str, Any] = {"results": [{**site.version_json(v), "page": {"id": page.id, "title": page.title}}
                                               for v in chunk], "_links": {"base": site.base_url + "/wiki"}}
            if start + limit < len(ordered):
                cursor = base64.urlsafe_b64encode(str(start + limit).encode()).decode().rstrip("=")
                sort = request.args.get("sort", "-modified-date")
                out["_links"]["next"] = f"/wiki/api/v2/pages/{pid}/versions?cursor={cursor}&limit={limit}&sort={sort}"
            return jsonify(out)

    @app.get("/wiki/api/v2/pages")
    def list_pages() -> Response:
        with site.lock:
            pages = list(site.pages.values())
            space_ids = [s for s in request.args.get("space-id", "").split(",") if s]
            if space_ids:
                pages = [p for p in pages if site.spaces[p.space]["id"] in space_ids]
            title = request.args.get("title")
            if title:
                pages = [p for p in pages if p.title == title]
            return jsonify({"results": [site.page_json(p, request.args.get("body-format")) for p in pages], "_links": {}})

    @app.get("/wiki/api/v2/spaces")
    def list_spaces() -> Response:
        with site.lock:
            return jsonify({"results": list(site.spaces.values()), "_links": {}})

    @app.get("/wiki/rest/api/search")
    @app.get("/wiki/rest/api/content/search")
    def search() -> Response:
        cql = request.args.get("cql", "")
        if not cql.strip():
            return err(400, "cql is required")
        try:
            start = max(int(request.args.get("start", 0)), 0)
            limit = min(max(int(request.args.get("limit", 25)), 1), 100)
        except ValueError:
            return err(400, "start and limit must be integers")
        with site.lock:
            try:
                q = jira_jql.parse(cql)
                resolver = _CqlResolver(site)
                pred = jira_jql.compile_query(q, resolver)
                hits = jira_jql.sort_issues([p for p in site.pages.values() if pred(p)], q, resolver)
            except jira_jql.JqlError as exc:
                message = str(exc).replace("JQL", "CQL").replace("Field '", "Could not parse cql, unknown field '")
                return err(400, message)
            chunk = hits[start: start + limit]
            plain = request.path.endswith("/content/search")
            results = []
            for p in chunk:
                content = {"id": p.id, "type": "page", "status": "current", "title": p.title,
                           "version": {"number": p.current.number, "when": iso(p.current.created)},
                           "_links": {"webui": f"/spaces/{p.space}/pages/{p.id}", "self": f"{site.base_url}/wiki/rest/api/content/{p.id}"}}
                if plain:
                    results.append(content)
                else:
                    text = re.sub(r"<[^>]+>", " ", p.current.body)
                    results.append({"content": content, "title": p.title, "excerpt": " ".join(text.split())[:200],
                                    "url": f"/spaces/{p.space}/pages/{p.id}", "entityType": "content",
                                    "lastModified": iso(p.current.created)})
            out: dict[str, Any] = {"results": results, "start": start, "limit": limit, "size": len(results),
                                   "totalSize": len(hits), "cqlQuery": cql, "_links": {"base": site.base_url + "/wiki"}}
            if start + limit < len(hits):
                out["_links"]["next"] = f"/rest/api/search?cql={cql}&start={start + limit}&limit={limit}"
            return jsonify(out)

    # ------------------------------------------------------------ control

    @app.post("/_emulator/confluence/pages")
    def seed_pages() -> Response:
        spec = control_json()
        pages = spec.get("pages")
        if not isinstance(pages, list):
            raise ValueError("'pages' must be a list")
        with site.lock:
            ids = [site.add_page(p).id for p in pages]
        return jsonify({"ids": ids})

    @app.post("/_emulator/confluence/pages/<pid>/versions")
    def add_version(pid: str) -> Response:
        spec = control_json()
        with site.lock:
            page = page_or_404(pid)
            v = site.add_version(page, spec)
        return jsonify(site.version_json(v))

    @app.get("/_emulator/confluence/state")
    def state() -> Response:
        with site.lock:
            return jsonify({"spaces": list(site.spaces.values()),
                            "pages": {p.id: {**site.page_json(p, "storage"), "versions": [site.version_json(v) for v in p.versions]}
                                      for p in site.pages.values()}})

    add_control_routes(app, "confluence", faults=faults, reset=site.reset)

    return app, site
