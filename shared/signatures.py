"""Webhook signature checks: Slack request signing and Jira Cloud admin webhooks (constant time)."""
from __future__ import annotations

import hashlib
import hmac
import time


def verify_slack_signature(signing_secret: str, timestamp: str, body: bytes, signature: str,
                           *, now: float | None = None, tolerance: int = 300) -> bool:
    """v0=HMAC-SHA256('v0:{ts}:{body}'), constant-time, rejecting timestamps more than 5 minutes off."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance:
        return False
    base = b"v0:" + str(ts).encode() + b":" + body
    expected = "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature or "")


def verify_jira_signature(secret: str, body: bytes, header: str | None) -> bool:
    """Jira Cloud admin webhooks: X-Hub-Signature: sha256=<hex HMAC-SHA256 of the raw body>."""
    if not header or not header.startswith("sha256="):
        return False
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)
