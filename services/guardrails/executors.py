"""Executors: guardrails writes approved actions with its own credentials (Jira REST v3, Slack incoming webhook).

Exactly once, from this side: a write is sent at most once per attempt (429 / 503 with Retry-After are
refusals, so they are waited out and resent; a timeout, a reset connection or a 502 / 504 after the request
left means the write may have happened and is NOT resent — the attempt ends `outcome_unknown`). Every
attempt after the first begins by looking in the target system for the write (a comment's marker line, the
link, the status), so a retry after a crash or an unknown outcome finds what happened instead of writing
again. Labels are idempotent by nature. A Slack message cannot be looked up; actions.py never resends one
whose outcome is unknown without an operator's explicit `force`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import requests
import urllib3

from shared.connectors.adf import adf_to_text
from shared.connectors.http import ConnectorError, RetryPolicy
from shared.connectors.jira import JiraClient
from shared.connectors.slack import post_incoming_webhook
from shared.settings import Secret

from .operations import marker

log = logging.getLogger(__name__)

LINK_TYPES_TTL = 300.0
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class OutcomeUnknown(Exception):
    """A write left this process and no answer came back: it may or may not have happened."""


class ExecutionError(Exception):
    """An execution attempt failed; `retryable` (worth an operator retry), `outcome_unknown` (it may have
    been written: the next attempt reconciles first)."""

    def __init__(self, message: str, *, retryable: bool, outcome_unknown: bool = False,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.outcome_unknown = outcome_unknown
        self.status = status


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request provably never reached the server (refused, or no connection within the timeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


class WriteSafeSession(requests.Session):
    """A session that stops the shared retry loop from resending a write that may already have landed."""

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        verb = method.decode() if isinstance(method, bytes) else method
        try:
            resp = super().request(method, url, *args, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            if verb.upper() in SAFE_METHODS or _never_sent(exc):
                raise  # request_with_retries may retry: nothing was written
            raise OutcomeUnknown(f"{verb} {url!s}: {type(exc).__name__} after the request was sent") from exc
        if verb.upper() not in SAFE_METHODS and resp.status_code in (502, 504):
            # A gateway error after the request reached a proxy: the write may have been applied behind it.
            raise OutcomeUnknown(f"{verb} {url!s}: HTTP {resp.status_code} from a gateway")
        return resp


@dataclass(frozen=True)
class Limits:
    """Per-execution HTTP limits from the policy (actions.execution)."""

    http_attempts: int = 4
    request_timeout_seconds: float = 15.0
    retry_budget_seconds: float = 60.0

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.http_attempts, base_delay=0.5, max_delay=30.0,
                           budget_seconds=self.retry_budget_seconds)


@dataclass
class Result:
    """What an execution wrote (`data`) and whether it was found already written (`reconciled`)."""

    data: dict[str, Any]
    reconciled: bool = False


class Executors:
    """The write connectors guardrails holds; nothing else in Metis has write credentials."""

    def __init__(self, *, jira_url: str | None = None, jira_email: str | None = None,
                 jira_token: Secret | None = None, slack_webhook_url: Secret | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.jira_url = jira_url.rstrip("/") if jira_url else None
        self._jira_email = jira_email or ""
        self._jira_token = jira_token
        self._slack_url = slack_webhook_url
        self._clock = clock
        self._link_types: tuple[float, list[str]] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Executors(jira={self.jira_url!r}, slack={'yes' if self._slack_url else 'no'})"

    # -------------------------------------------------------------- jira

    def jira(self, limits: Limits) -> JiraClient:
        """A Jira client with guardrails' write credentials and a session that never resends a landed write."""
        if not (self.jira_url and self._jira_token):
            raise ExecutionError("the Jira connector is not configured (METIS_JIRA_URL, METIS_JIRA_EMAIL, "
                                 "METIS_JIRA_API_TOKEN)", retryable=True)
        return JiraClient(self.jira_url, self._jira_email, self._jira_token.get(), policy=limits.retry_policy(),
                          timeout=limits.request_timeout_seconds, session=WriteSafeSession())

    def link_types(self) -> list[str]:
        """Names of the link types this Jira has (cached for five minutes); raises ConnectorError."""
        with self._lock:
            cached = self._link_types
        if cached and self._clock() - cached[0] < LINK_TYPES_TTL:
            return cached[1]
        try:
            names = [str(t["name"]) for t in self.jira(Limits(http_attempts=2, retry_budget_seconds=5)).link_types()]
        except ExecutionError as exc:
            raise ConnectorError(str(exc)) from exc
        with self._lock:
            self._link_types = (self._clock(), names)
        return names

    # -------------------------------------------------------------- executing

    def execute(self, action: Mapping[str, Any], *, attempt: int, limits: Limits) -> Result:
        """Perform one attempt of the action; attempts after the first reconcile before writing."""
        kind = f"{action['connector']}.{action['operation']}"
        try:
            if action["connector"] == "jira":
                return self._jira_execute(kind, action, attempt, limits)
            if kind == "slack.post_message":
                return self._slack_post(action, limits)
        except OutcomeUnknown as exc:
            raise ExecutionError(f"{exc}; the write may have happened (the next attempt checks before writing)",
                                 retryable=True, outcome_unknown=True) from exc
        except ConnectorError as exc:
            raise ExecutionError(str(exc), retryable=exc.retryable or exc.status is None, status=exc.status) from exc
        except requests.RequestException as exc:  # a read that failed for good (nothing was written)
            raise ExecutionError(f"{type(exc).__name__}: {exc}"[:500], retryable=True) from exc
        raise ExecutionError(f"no executor for {kind}", retryable=False)

    def _jira_execute(self, kind: str, action: Mapping[str, Any], attempt: int, limits: Limits) -> Result:
        client = self.jira(limits)
        key, payload = str(action["target"]), action["payload"]
        if attempt > 1:
            found = self.reconcile(client, action)
            if found is not None:
                return Result(found, reconciled=True)
        if kind == "jira.add_comment":
            created = client.add_comment(key, payload["body"], internal=bool(payload.get("internal")))
            return Result({"comment_id": str(created.get("id")), "issue": key})
        if kind == "jira.add_labels":
            client.add_labels(key, payload["labels"])
            return Result({"labels": list(payload["labels"]), "issue": key})
        if kind == "jira.link_issues":
            client.link_issues(payload["type"], payload["inward"], payload["outward"], payload.get("comment"))
            return Result({"type": payload["type"], "inward": payload["inward"], "outward": payload["outward"]})
        if kind == "jira.transition":
            wanted = str(payload["to"]).lower()
            options = client.transitions(key)
            match = next((t for t in options if str((t.get("to") or {}).get("name", "")).lower() == wanted
                          or str(t.get("name", "")).lower() == wanted), None)
            if match is None:
                status = self._status(client, key)
                if status.lower() == wanted:
                    return Result({"status": status, "issue": key}, reconciled=True)
                raise ExecutionError(f"{key} has no transition from {status!r} to {payload['to']!r} "
                                     f"(available: {', '.join(str(t.get('name')) for t in options) or 'none'})",
                                     retryable=False)
            client.transition(key, str(match["id"]))
            return Result({"status": str((match.get("to") or {}).get("name") or payload["to"]),
                           "transition_id": str(match["id"]), "issue": key})
        raise ExecutionError(f"no executor for {kind}", retryable=False)

    @staticmethod
    def _status(client: JiraClient, key: str) -> str:
        issue = client.get_issue(key, fields=["status"])
        return str(((issue.get("fields") or {}).get("status") or {}).get("name", ""))

    def reconcile(self, client: JiraClient, action: Mapping[str, Any]) -> dict[str, Any] | None:
        """Look in Jira for the write of an earlier attempt; its result if it is there, else None."""
        kind = f"{action['connector']}.{action['operation']}"
        key, payload = str(action["target"]), action["payload"]
        if kind == "jira.add_comment":
            line = marker(action["id"])
            for comment in client.comments(key):
                # Only the comment's last paragraph counts: ticket text quoted in a comment cannot fake it.
                blocks = (comment.get("body") or {}).get("content") or []
                if blocks and adf_to_text(blocks[-1]).strip() == line:
                    return {"comment_id": str(comment.get("id")), "issue": key}
            return None
        if kind == "jira.link_issues":
            issue = client.get_issue(payload["inward"], fields=["issuelinks"])
            for link in (issue.get("fields") or {}).get("issuelinks") or []:
                if (str((link.get("type") or {}).get("name", "")).lower() == str(payload["type"]).lower()
                        and (link.get("outwardIssue") or {}).get("key") == payload["outward"]):
                    return {"type": payload["type"], "inward": payload["inward"], "outward": payload["outward"],
                            "link_id": str(link.get("id"))}
            return None
        if kind == "jira.transition":
            status = self._status(client, key)
            return {"status": status, "issue": key} if status.lower() == str(payload["to"]).lower() else None
        return None  # labels: adding them again is harmless

    def can_reconcile(self, action: Mapping[str, Any]) -> bool:
        """Whether a write of this kind can be looked up (or safely repeated) after an unknown outcome."""
        return bool(action["connector"] == "jira")

    # -------------------------------------------------------------- slack

    def _slack_post(self, action: Mapping[str, Any], limits: Limits) -> Result:
        if not self._slack_url:
            raise ExecutionError("the Slack connector is not configured (METIS_SLACK_WEBHOOK_URL)", retryable=True)
        payload = action["payload"]
        message: dict[str, Any] = {"text": payload["text"]}
        if payload.get("blocks"):
            message["blocks"] = payload["blocks"]
        post_incoming_webhook(self._slack_url.get(), message, policy=limits.retry_policy(),
                              session=WriteSafeSession())
        return Result({"posted": True, "channel": action["target"]})
