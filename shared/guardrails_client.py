"""The client every service uses to talk to guardrails: runs, an Anthropic SDK wired to the gateway, heartbeats.

    gr = GuardrailsClient.from_settings(settings)
    with gr.run("triage", trigger="event", external_id=execution_id) as run:
        llm = gr.anthropic(run.id)
        try:
            msg = llm.messages.create(model="claude-haiku-4-5", max_tokens=512, messages=[...])
        except BudgetDenied:
            ...  # fall back to the offline / deterministic mode

Every refusal by guardrails (budget caps, kill switch, model policy, closed run) surfaces as ONE typed error,
`BudgetDenied`, from run opening, LLM calls and heartbeats alike; it is never retried.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import anthropic
import requests
from anthropic import Middleware
from anthropic._middleware import CallNext
from anthropic._request import APIRequest
from anthropic._response import APIResponse

from .settings import Secret, Settings

RUN_HEADER = "X-Metis-Run-Id"
JUSTIFICATION_HEADER = "X-Metis-Justification"
DENIAL_HEADER = "X-Metis-Denial"


class GuardrailsError(Exception):
    """guardrails answered with an error that is not a denial (bad input, unknown run, unavailable)."""

    def __init__(self, message: str, *, status: int, code: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = body


class BudgetDenied(GuardrailsError):
    """guardrails refused: a cap is exhausted, the kill switch is engaged, or policy forbids it. Do not retry."""

    @property
    def reason(self) -> str:
        return self.code


@dataclass(frozen=True)
class Run:
    """An open (or finished) run and its budget in micro-USD."""

    id: str
    task: str
    trigger: str
    status: str
    created: bool
    budget: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Run":
        return cls(id=str(data["id"]), task=str(data["task"]), trigger=str(data["trigger"]),
                   status=str(data["status"]), created=bool(data.get("created", False)),
                   budget=dict(data.get("budget") or {}))


def _denial_from_body(status: int, body: Any, default_code: str) -> GuardrailsError:
    """problem+json (`code`) or Anthropic shape (`error.details.error_code`) -> the typed error."""
    code, message = default_code, f"HTTP {status}"
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            err = body["error"]
            message = str(err.get("message") or message)
            details = err.get("details")
            if isinstance(details, dict) and details.get("error_code"):
                code = str(details["error_code"])
        else:
            code = str(body.get("code") or code)
            message = str(body.get("detail") or message)
    cls = BudgetDenied if status == 403 else GuardrailsError
    return cls(message, status=status, code=code, body=body)


class _DenialMiddleware(Middleware):
    """Turns a gateway denial into BudgetDenied before the SDK builds its own error (and never retries it)."""

    def handle(self, request: APIRequest, call_next: CallNext) -> APIResponse[Any]:
        response = call_next(request)
        http = response.http_response
        if http.status_code == 403 and http.headers.get(DENIAL_HEADER):
            http.read()
            try:
                body = json.loads(http.text)
            except ValueError:
                body = None
            raise _denial_from_body(403, body, http.headers[DENIAL_HEADER])
        return response


class GuardrailsClient:
    """HTTP client for the guardrails API with this service's own token."""

    def __init__(self, base_url: str, token: Secret | str, *, timeout: float = 10.0,
                 session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token if isinstance(token, Secret) else Secret(token)
        self._timeout = timeout
        self._session = session or requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> "GuardrailsClient":
        """Uses settings.guardrails_url and this service's own token (METIS_TOKEN_<SERVICE>)."""
        if not settings.own_token:
            raise ValueError(f"no token for {settings.service}: set METIS_TOKEN_{settings.service.upper()}")
        return cls(settings.guardrails_url, settings.own_token, **kwargs)

    # -------------------------------------------------------------- plumbing

    def _request(self, method: str, path: str, *, json_body: Any = None,
                 params: Mapping[str, Any] | None = None) -> Any:
        try:
            resp = self._session.request(method, self.base_url + path, json=json_body, params=params,
                                         headers={"Authorization": f"Bearer {self._token.get()}"},
                                         timeout=self._timeout)
        except requests.RequestException as exc:
            raise GuardrailsError(f"guardrails unreachable: {type(exc).__name__}", status=0,
                                  code="unreachable") from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            raise _denial_from_body(resp.status_code, body, "error")
        return resp.json() if resp.content else None

    # -------------------------------------------------------------- runs

    def open_run(self, task: str, *, trigger: str, workflow: str = "", external_id: str | None = None) -> Run:
        """Open a run; the same (task, external_id) returns the same run. Raises BudgetDenied when refused."""
        body = {"task": task, "trigger": trigger, "workflow": workflow, "external_id": external_id}
        return Run.from_json(self._request("POST", "/v1/runs", json_body=body))

    def finish_run(self, run_id: str, status: str = "succeeded", outcome: Mapping[str, Any] | None = None) -> Run:
        """Finish a run with succeeded / failed / cancelled."""
        data = self._request("POST", f"/v1/runs/{run_id}/finish",
                             json_body={"status": status, "outcome": dict(outcome or {})})
        return Run.from_json(data)

    def get_run(self, run_id: str) -> Run:
        return Run.from_json(self._request("GET", f"/v1/runs/{run_id}"))

    @contextmanager
    def run(self, task: str, *, trigger: str, workflow: str = "", external_id: str | None = None) -> Iterator[Run]:
        """Open a run, finish it `succeeded`, or `failed` if the block raises (the error propagates)."""
        run = self.open_run(task, trigger=trigger, workflow=workflow, external_id=external_id)
        try:
            yield run
        except BaseException as exc:
            self.finish_run(run.id, "failed", {"error": type(exc).__name__})
            raise
        self.finish_run(run.id, "succeeded")

    # -------------------------------------------------------------- LLM

    def anthropic(self, run_id: str, *, justification: str | None = None, max_retries: int = 2,
                  timeout: float = 120.0) -> anthropic.Anthropic:
        """The official SDK pointed at the gateway for this run. Denials raise BudgetDenied (not retried);
        upstream 429 / 529 are retried by the SDK itself, `max_retries` times."""
        headers = {RUN_HEADER: run_id}
        if justification:
            headers[JUSTIFICATION_HEADER] = justification
        return anthropic.Anthropic(api_key=self._token.get(), base_url=f"{self.base_url}/anthropic",
                                   default_headers=headers, max_retries=max_retries, timeout=timeout,
                                   middleware=[_DenialMiddleware()])

    # -------------------------------------------------------------- heartbeats and state

    def heartbeat(self, name: str) -> dict[str, Any]:
        """Check in; raises BudgetDenied(kill_switch_engaged) when the job must not run."""
        result: dict[str, Any] = self._request("POST", f"/v1/heartbeats/{name}")
        return result

    def kill_switch(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/v1/kill-switch")
        return result
