"""Jira Cloud REST v3 client: JQL search with nextPageToken paging, issues, ADF comments, labels, links, transitions."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

from .adf import is_adf, text_to_adf
from .http import BasicAuthClient, ConnectorError, request_with_retries


class JiraClient(BasicAuthClient):
    """Talks to a Jira Cloud site (or the local emulator) by URL with Basic auth (email + API token)."""

    def _call(self, method: str, path: str, *, expect: Sequence[int] = (200,), **kwargs: Any) -> Any:
        url = f"{self.base_url}{path}"
        resp = request_with_retries(self.session, method, url, policy=self.policy, timeout=self.timeout, **kwargs)
        if resp.status_code not in expect:
            detail = resp.text
            try:
                body = resp.json()
                msgs = list(body.get("errorMessages", [])) + [f"{k}: {v}" for k, v in body.get("errors", {}).items()]
                detail = "; ".join(msgs) or detail
            except ValueError:
                pass
            raise ConnectorError(f"Jira {method} {path} → {resp.status_code}: {detail}"[:500],
                                 status=resp.status_code, body=resp.text,
                                 retryable=resp.status_code in (429, 502, 503, 504))
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def get_issue(self, key: str, fields: Sequence[str] | None = None) -> dict[str, Any]:
        params = {"fields": ",".join(fields)} if fields else None
        return self._call("GET", f"/rest/api/3/issue/{key}", params=params)  # type: ignore[no-any-return]

    def search_page(self, jql: str, *, fields: Sequence[str] = ("*navigable",), max_results: int = 100,
                    next_page_token: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"jql": jql, "fields": list(fields), "maxResults": max_results}
        if next_page_token:
            body["nextPageToken"] = next_page_token
        return self._call("POST", "/rest/api/3/search/jql", json=body)  # type: ignore[no-any-return]

    def search(self, jql: str, *, fields: Sequence[str] = ("*navigable",), page_size: int = 100,
               start_token: str | None = None) -> Iterator[tuple[dict[str, Any], str | None]]:
        """Yield (issue, token of the page it came from) across every page; the token lets callers resume."""
        token = start_token
        while True:
            page = self.search_page(jql, fields=fields, max_results=page_size, next_page_token=token)
            for issue in page.get("issues", []):
                yield issue, token
            token = page.get("nextPageToken")
            if page.get("isLast", token is None) or not token:
                return

    def add_comment(self, key: str, body: str | dict[str, Any], *,
                    internal: bool = False) -> dict[str, Any]:
        """Add a comment (ADF, or plain text turned into ADF); internal=True marks it Service Desk internal."""
        doc = body if is_adf(body) else text_to_adf(str(body))
        payload: dict[str, Any] = {"body": doc}
        if internal:
            payload["properties"] = [{"key": "sd.public.comment", "value": {"internal": True}}]
        return self._call("POST", f"/rest/api/3/issue/{key}/comment", json=payload,  # type: ignore[no-any-return]
                          expect=(201,))

    def comments(self, key: str, *, newest_first: bool = True, page_size: int = 100,
                 max_pages: int = 10) -> Iterator[dict[str, Any]]:
        """Comments of an issue (ADF bodies), newest first by default, at most max_pages pages."""
        start = 0
        for _ in range(max_pages):
            page = self._call("GET", f"/rest/api/3/issue/{key}/comment",
                              params={"startAt": start, "maxResults": page_size,
                                      "orderBy": "-created" if newest_first else "created"})
            items = page.get("comments", [])
            yield from items
            start += len(items)
            if not items or start >= int(page.get("total", 0)):
                return

    def add_labels(self, key: str, labels: Sequence[str]) -> None:
        self._call("PUT", f"/rest/api/3/issue/{key}", json={"update": {"labels": [{"add": lb} for lb in labels]}},
                   expect=(204,))

    def link_issues(self, link_type: str, inward: str, outward: str, comment: str | None = None) -> None:
        payload: dict[str, Any] = {"type": {"name": link_type}, "inwardIssue": {"key": inward},
                                   "outwardIssue": {"key": outward}}
        if comment:
            payload["comment"] = {"body": text_to_adf(comment)}
        self._call("POST", "/rest/api/3/issueLink", json=payload, expect=(201,))

    def link_types(self) -> list[dict[str, Any]]:
        return self._call("GET", "/rest/api/3/issueLinkType").get("issueLinkTypes", [])  # type: ignore[no-any-return]

    def transitions(self, key: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/rest/api/3/issue/{key}/transitions").get("transitions", [])  # type: ignore[no-any-return]

    def transition(self, key: str, transition_id: str) -> None:
        self._call("POST", f"/rest/api/3/issue/{key}/transitions", json={"transition": {"id": transition_id}},
                   expect=(204,))
