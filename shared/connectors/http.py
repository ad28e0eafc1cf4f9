"""HTTP with bounded retries that honour Retry-After (Jira, Slack, Salesforce, Confluence)."""
from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import requests

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})


class ConnectorError(Exception):
    """A call to an external system failed; `status` is the HTTP status (None for network errors)."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "", retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.body = body[:2000]
        self.retryable = retryable


def retry_after_seconds(value: str | None, default: float) -> float:
    """Parse Retry-After (delta-seconds or an HTTP date)."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time())


@dataclass
class RetryPolicy:
    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0
    # Never wait longer than this in total; the caller (n8n, an operator) retries later instead.
    budget_seconds: float = 60.0


def request_with_retries(session: requests.Session, method: str, url: str, *, policy: RetryPolicy,
                         sleep: Callable[[float], None] = time.sleep, timeout: float = 15.0,
                         **kwargs: Any) -> requests.Response:
    """Send a request; retry 429/502/503/504 and connection errors, waiting what Retry-After asks."""
    waited = 0.0
    for attempt in range(1, policy.attempts + 1):
        try:
            resp = session.request(method, url, timeout=timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            if attempt == policy.attempts:
                raise ConnectorError(f"{method} {url}: {type(exc).__name__}", retryable=True) from exc
            delay = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        else:
            if resp.status_code not in RETRY_STATUSES or attempt == policy.attempts:
                return resp
            default = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
            # Honour Retry-After exactly: retrying earlier than asked is what gets clients banned.
            delay = retry_after_seconds(resp.headers.get("Retry-After"), default)
        if delay > policy.max_delay or waited + delay > policy.budget_seconds:
            raise ConnectorError(f"{method} {url}: retry budget exhausted", retryable=True)
        log.info("retrying", extra={"url": url, "attempt": attempt, "delay": round(delay, 2)})
        sleep(delay)
        waited += delay
    raise AssertionError("unreachable")


class BasicAuthClient:
    """A site reached by URL with HTTP Basic auth (Atlassian Cloud: account e-mail + API token), JSON answers,
    calls retried per `policy`; the real service or its local emulator, by URL only."""

    def __init__(self, base_url: str, email: str, api_token: str, *, policy: RetryPolicy | None = None,
                 timeout: float = 15.0, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.session.auth = (email, api_token)
        self.session.headers.update({"Accept": "application/json"})
        self.policy = policy or RetryPolicy()
        self.timeout = timeout

    def __repr__(self) -> str:  # never the credentials
        return f"{type(self).__name__}({self.base_url!r})"
