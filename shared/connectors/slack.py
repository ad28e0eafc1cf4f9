"""Slack incoming webhooks (Block Kit)."""
from __future__ import annotations

from typing import Any

import requests

from .http import ConnectorError, RetryPolicy, request_with_retries


def post_incoming_webhook(url: str, message: dict[str, Any], *, policy: RetryPolicy | None = None,
                          session: requests.Session | None = None) -> None:
    """Post a Block Kit message; Slack answers 200 'ok' or 4xx with a reason such as invalid_payload."""
    session = session or requests.Session()
    resp = request_with_retries(session, "POST", url, policy=policy or RetryPolicy(), json=message)
    if resp.status_code != 200:
        raise ConnectorError(f"Slack webhook → {resp.status_code}: {resp.text[:200]}", status=resp.status_code,
                             body=resp.text, retryable=resp.status_code in (429, 500, 502, 503, 504))
