"""Salesforce REST (read-only): OAuth 2.0 client-credentials token, SOQL query with nextRecordsUrl paging."""
from __future__ import annotations

import threading
from typing import Any, Iterator
from urllib.parse import urljoin

import requests

from .http import ConnectorError, RetryPolicy, request_with_retries

DEFAULT_API_VERSION = "v62.0"


def _salesforce_error(resp: requests.Response) -> str:
    """Salesforce errors are a list of {message, errorCode}; OAuth errors are {error, error_description}."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, list):
        return "; ".join(f"{e.get('errorCode', '?')}: {e.get('message', '')}" for e in body if isinstance(e, dict))
    if isinstance(body, dict):
        if "error" in body:
            return f"{body.get('error')}: {body.get('error_description', '')}"
        return str(body)[:300]
    return resp.text[:300]


class SalesforceClient:
    """Reads a Salesforce org (or the local emulator) by URL with a client-credentials access token."""

    def __init__(self, login_url: str, client_id: str, client_secret: str, *,
                 api_version: str = DEFAULT_API_VERSION, policy: RetryPolicy | None = None,
                 timeout: float = 15.0, session: requests.Session | None = None,
                 batch_size: int | None = None) -> None:
        self.login_url = login_url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self.api_version = api_version if api_version.startswith("v") else f"v{api_version}"
        self.session = session or requests.Session()
        self.session.headers.update({"Accept": "application/json"})
        self.policy = policy or RetryPolicy()
        self.timeout = timeout
        self.batch_size = batch_size
        self._token: str | None = None
        self._instance_url: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SalesforceClient({self.login_url!r})"

    def authenticate(self) -> str:
        """Fetch a fresh access token (client-credentials flow); returns the instance URL it is valid for."""
        url = f"{self.login_url}/services/oauth2/token"
        resp = request_with_retries(self.session, "POST", url, policy=self.policy, timeout=self.timeout,
                                    data={"grant_type": "client_credentials", "client_id": self._client_id,
                                          "client_secret": self._client_secret})
        if resp.status_code != 200:
            raise ConnectorError(f"Salesforce token → {resp.status_code}: {_salesforce_error(resp)}",
                                 status=resp.status_code, body=resp.text,
                                 retryable=resp.status_code in (429, 502, 503, 504))
        try:
            body = resp.json()
            token, instance = str(body["access_token"]), str(body.get("instance_url") or self.login_url)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConnectorError("Salesforce token response has no access_token", status=resp.status_code,
                                 body=resp.text) from exc
        with self._lock:
            self._token, self._instance_url = token, instance.rstrip("/")
        return instance

    def _get(self, path_or_url: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET with the bearer token; one re-authentication when the session expired (401)."""
        for attempt in (1, 2):
            if self._token is None:
                self.authenticate()
            assert self._instance_url is not None and self._token is not None
            url = urljoin(self._instance_url + "/", path_or_url.lstrip("/"))
            headers = {"Authorization": f"Bearer {self._token}"}
            if self.batch_size:
                headers["Sforce-Query-Options"] = f"batchSize={self.batch_size}"
            resp = request_with_retries(self.session, "GET", url, policy=self.policy, timeout=self.timeout,
                                        params=params, headers=headers)
            if resp.status_code == 401 and attempt == 1:
                # INVALID_SESSION_ID: tokens expire or are revoked; a new one is one POST away.
                self._token = None
                continue
            if resp.status_code != 200:
                raise ConnectorError(f"Salesforce GET {path_or_url.split('?')[0]} → {resp.status_code}: "
                                     f"{_salesforce_error(resp)}"[:500], status=resp.status_code, body=resp.text,
                                     retryable=resp.status_code in (429, 502, 503, 504))
            try:
                data = resp.json()
            except ValueError as exc:
                raise ConnectorError("Salesforce returned a non-JSON body", status=200, body=resp.text) from exc
            if not isinstance(data, dict):
                raise ConnectorError("Salesforce returned an unexpected body", status=200, body=resp.text)
            return data
        raise AssertionError("unreachable")

    def query_page(self, soql: str) -> dict[str, Any]:
        """The first page of a SOQL query: {totalSize, done, records, nextRecordsUrl?}."""
        return self._get(f"/services/data/{self.api_version}/query", params={"q": soql})

    def query(self, soql: str) -> Iterator[dict[str, Any]]:
        """Yield every record of a SOQL query, following nextRecordsUrl until done."""
        page = self.query_page(soql)
        seen: set[str] = set()
        while True:
            for record in page.get("records", []):
                yield record
            next_url = page.get("nextRecordsUrl")
            if page.get("done", True) or not next_url:
                return
            if next_url in seen:
                raise ConnectorError(f"Salesforce paging loops at {next_url}")
            seen.add(next_url)
            page = self._get(str(next_url))

    def query_all(self, soql: str) -> list[dict[str, Any]]:
        """Every record of a SOQL query as a list, with the `attributes` metadata removed."""
        return [{k: v for k, v in r.items() if k != "attributes"} for r in self.query(soql)]
