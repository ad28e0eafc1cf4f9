"""Confluence Cloud REST v2 (read-only): pages and their versions, cursor paging through `_links.next`."""
from __future__ import annotations

from typing import Any, Iterator, Sequence
from urllib.parse import urljoin

from .http import BasicAuthClient, ConnectorError, request_with_retries


class ConfluenceClient(BasicAuthClient):
    """Reads a Confluence Cloud site (or the local emulator) by URL with Basic auth (email + API token)."""

    # base_url is the site root (https://example.atlassian.net); the API lives under /wiki.

    def _get(self, path: str, params: dict[str, Any] | None = None,
             expect: Sequence[int] = (200,)) -> dict[str, Any]:
        url = urljoin(self.base_url + "/", path.lstrip("/"))
        resp = request_with_retries(self.session, "GET", url, policy=self.policy, timeout=self.timeout,
                                    params=params)
        if resp.status_code not in expect:
            detail = resp.text[:300]
            try:
                body = resp.json()
                errors = body.get("errors") if isinstance(body, dict) else None
                if errors:
                    detail = "; ".join(str(e.get("title") or e.get("detail") or e) for e in errors)
                elif isinstance(body, dict) and body.get("message"):
                    detail = str(body["message"])
            except ValueError:
                pass
            raise ConnectorError(f"Confluence GET {path.split('?')[0]} → {resp.status_code}: {detail}"[:500],
                                 status=resp.status_code, body=resp.text,
                                 retryable=resp.status_code in (429, 502, 503, 504))
        try:
            data = resp.json()
        except ValueError as exc:
            raise ConnectorError("Confluence returned a non-JSON body", status=resp.status_code,
                                 body=resp.text) from exc
        if not isinstance(data, dict):
            raise ConnectorError("Confluence returned an unexpected body", status=resp.status_code, body=resp.text)
        return data

    def get_page(self, page_id: str | int, *, body_format: str | None = None) -> dict[str, Any]:
        """A page with its current version ({number, createdAt, authorId, message})."""
        params = {"body-format": body_format} if body_format else None
        return self._get(f"/wiki/api/v2/pages/{page_id}", params=params)

    def page_versions(self, page_id: str | int, *, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Yield every version of a page, newest first, following the cursor links."""
        path: str | None = f"/wiki/api/v2/pages/{page_id}/versions"
        params: dict[str, Any] | None = {"limit": limit, "sort": "-modified-date"}
        seen: set[str] = set()
        while path:
            page = self._get(path, params=params)
            yield from page.get("results", [])
            nxt = (page.get("_links") or {}).get("next")
            if not nxt:
                return
            if nxt in seen:
                raise ConnectorError(f"Confluence paging loops at {nxt}")
            seen.add(nxt)
            # The next link carries the cursor and every parameter already; the API lives under /wiki.
            path = nxt if str(nxt).startswith("/wiki/") else "/wiki" + str(nxt)
            params = None
