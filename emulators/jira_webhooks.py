"""Jira Cloud webhook sender: real-shaped bodies, `X-Hub-Signature: sha256=<hex>` (HMAC-SHA256 of the raw body
keyed with the webhook's secret), `X-Atlassian-Webhook-Identifier` (same across retries and redeliveries),
`X-Atlassian-Webhook-Retry` on retries, `X-Atlassian-Webhook-Flow: Primary`; a record of every delivery."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import requests

EVENTS = ("jira:issue_created", "jira:issue_updated", "comment_created", "issuelink_created")


def sign(secret: str, raw: bytes) -> str:
    """The X-Hub-Signature value Jira Cloud sends for a body."""
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


@dataclass
class Webhook:
    id: int
    url: str
    secret: str | None
    events: tuple[str, ...]
    jql: str | None
    asynchronous: bool
    retry_delays: tuple[float, ...]

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "events": list(self.events), "jql": self.jql, "async": self.asynchronous,
                "signed": bool(self.secret), "retry_delays": list(self.retry_delays)}


@dataclass
class Delivery:
    identifier: str
    webhook: Webhook
    event: str
    raw: bytes
    attempts: list[dict[str, Any]] = field(default_factory=list)
    status: str = "pending"

    def public(self) -> dict[str, Any]:
        return {"identifier": self.identifier, "webhook_id": self.webhook.id, "url": self.webhook.url, "event": self.event,
                "status": self.status, "attempts": list(self.attempts), "body": json.loads(self.raw)}


class WebhookHub:
    """Registered webhooks and their deliveries; async deliveries go through one ordered worker thread."""

    def __init__(self, default_secret: str | None) -> None:
        self.default_secret = default_secret
        self.lock = threading.Lock()
        self.hooks: list[Webhook] = []
        self.deliveries: list[Delivery] = []
        self._ids = itertools.count(1)
        self._queue: queue.Queue[tuple[Delivery, int, int] | None] = queue.Queue()
        self._session = requests.Session()
        self._worker = threading.Thread(target=self._run, name="jira-webhooks", daemon=True)
        self._worker.start()
        self._generation = 0

    def reset(self) -> None:
        with self.lock:
            self.hooks.clear()
            self.deliveries.clear()
            self._generation += 1

    def register(self, spec: dict[str, Any]) -> Webhook:
        url = spec.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError("webhook 'url' must be an http(s) URL")
        events = tuple(spec.get("events") or EVENTS)
        unknown = [e for e in events if e not in EVENTS]
        if unknown:
            raise ValueError(f"unknown webhook events {unknown}; known: {list(EVENTS)}")
        secret = spec["secret"] if "secret" in spec else self.default_secret
        delays = tuple(float(d) for d in spec.get("retry_delays", (0.2, 0.5)))
        hook = Webhook(next(self._ids), url, secret or None, events, spec.get("jql"), bool(spec.get("async", False)), delays)
        with self.lock:
            self.hooks.append(hook)
        return hook

    def targets(self, event: str, matches: Callable[[str], bool]) -> list[Webhook]:
        """Webhooks subscribed to `event` whose JQL filter (if any) matches."""
        with self.lock:
            hooks = [h for h in self.hooks if event in h.events]
        return [h for h in hooks if not h.jql or matches(h.jql)]

    def send(self, hook: Webhook, event: str, body: dict[str, Any]) -> Delivery:
        """Deliver one body to one webhook (now, or queued when the webhook is asynchronous)."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        delivery = Delivery(f"{int(time.time() * 1000)}-{secrets.token_hex(8)}", hook, event, raw)
        with self.lock:
            self.deliveries.append(delivery)
            if len(self.deliveries) > 5000:
                del self.deliveries[:1000]
        if hook.asynchronous:
            with self.lock:
                generation = self._generation
            self._queue.put((delivery, 0, generation))
        else:
            self._attempt(delivery, 0)
        return delivery

    def redeliver(self, identifier: str | None) -> Delivery:
        """Send a recorded delivery again: same body, same identifier (an at-least-once duplicate)."""
        with self.lock:
            if not self.deliveries:
                raise ValueError("no deliveries to redeliver")
            found = self.deliveries[-1] if identifier is None else next(
                (d for d in self.deliveries if d.identifier == identifier), None)
        if found is None:
            raise ValueError(f"no delivery {identifier!r}")
        self._attempt(found, len(found.attempts))
        return found

    def _attempt(self, delivery: Delivery, retry: int) -> None:
        hook = delivery.webhook
        headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Atlassian Webhook HTTP Client",
                   "X-Atlassian-Webhook-Identifier": delivery.identifier, "X-Atlassian-Webhook-Flow": "Primary"}
        if retry:
            headers["X-Atlassian-Webhook-Retry"] = str(retry)
        if hook.secret:
            headers["X-Hub-Signature"] = sign(hook.secret, delivery.raw)
        record: dict[str, Any] = {"at": time.time(), "retry": retry}
        try:
            resp = self._session.post(hook.url, data=delivery.raw, headers=headers, timeout=15)
            record["status"] = resp.status_code
            ok = 200 <= resp.status_code < 300
        except requests.RequestException as exc:
            record["error"] = type(exc).__name__
            ok = False
        with self.lock:
            delivery.attempts.append(record)
            delivery.status = "delivered" if ok else ("retrying" if retry < len(hook.retry_delays) else "failed")
            generation = self._generation
        if not ok and retry < len(hook.retry_delays):
            timer = threading.Timer(hook.retry_delays[retry], self._retry, args=(delivery, retry + 1, generation))
            timer.daemon = True
            timer.start()

    def _retry(self, delivery: Delivery, retry: int, generation: int) -> None:
        with self.lock:
            if generation != self._generation:  # reset since: drop
                return
        self._attempt(delivery, retry)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            delivery, retry, generation = item
            try:
                self._retry(delivery, retry, generation)  # dropped if the emulator was reset meanwhile
            except Exception:  # the worker must survive any single bad delivery
                continue

    def idle(self) -> bool:
        """True when no delivery is queued or waiting for a retry."""
        with self.lock:
            return self._queue.empty() and all(d.status not in ("pending", "retrying") for d in self.deliveries)
