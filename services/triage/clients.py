"""HTTP clients triage uses: dedupe (evidence) and guardrails (LLM gateway, proposals, escalations)."""
from __future__ import annotations

import logging
from typing import Any, Callable

import anthropic
import requests

from shared import guardrails_client as gc
from shared.settings import Secret

from .service import BudgetDenied, GuardrailsError, LlmUnavailable, MessagesCreate, RetrievalError, Ticket

log = logging.getLogger(__name__)

COST_HEADER = "X-Metis-Cost-USD"


class DedupeClient:
    """Similar resolved tickets and duplicate candidates from the dedupe service."""

    def __init__(self, base_url: str, token: Secret, *, timeout: float = 5.0,
                 session: requests.Session | None = None) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._session = session or requests.Session()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self._session.post(self._base + path, json=body, timeout=self._timeout,
                                   headers={"Authorization": f"Bearer {self._token.get()}"})
        except requests.RequestException as exc:
            raise RetrievalError(f"dedupe {path}: {type(exc).__name__}") from exc
        if r.status_code != 200:
            raise RetrievalError(f"dedupe {path}: HTTP {r.status_code} {r.text[:200]}")
        data = r.json()
        if not isinstance(data, dict):
            raise RetrievalError(f"dedupe {path}: unexpected body")
        return data

    def similar(self, ticket: Ticket, limit: int) -> list[dict[str, Any]]:
        """Resolved tickets (and KB articles) similar to the ticket, best first."""
        data = self._post("/v1/similar", {"ticket": ticket.for_dedupe(), "limit": limit})
        for name in ("similar", "results", "tickets", "candidates"):
            if isinstance(data.get(name), list):
                return [x for x in data[name] if isinstance(x, dict) and x.get("key") != ticket.key]
        raise RetrievalError("dedupe /v1/similar: no result list in the answer")

    def duplicates(self, ticket: Ticket, limit: int) -> dict[str, Any]:
        """Duplicate verdict and candidates for a defect."""
        return self._post("/v1/duplicates", {"ticket": ticket.for_dedupe(), "limit": limit})


class GuardrailsClient:
    """Triage's side of the guardrails protocol: LLM calls through the gateway, proposals, escalations."""

    def __init__(self, base_url: str, token: Secret, *, timeout: float = 10.0, llm_timeout: float = 60.0,
                 session: requests.Session | None = None) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._llm_timeout = llm_timeout
        self._session = session or requests.Session()

    def anthropic_for_run(self, run_id: str) -> anthropic.Anthropic:
        """The official SDK wired to the gateway (shared client): our token as the key, the run id in a header.
        The SDK owns LLM retries (429 / 529 / 5xx); denials are never retried."""
        return gc.GuardrailsClient(self._base, self._token).anthropic(run_id, max_retries=2,
                                                                      timeout=self._llm_timeout)

    def messages_create(self, run_id: str) -> MessagesCreate:
        """A Messages API caller for one run that reports the gateway's cost and maps denials to BudgetDenied."""
        client = self.anthropic_for_run(run_id)

        def create(**kwargs: Any) -> tuple[Any, float | None]:
            try:
                raw = client.messages.with_raw_response.create(**kwargs)
            except gc.BudgetDenied as exc:
                raise BudgetDenied(f"{exc.reason}: {exc}") from exc
            except anthropic.APIStatusError as exc:
                denial = exc.response.headers.get(gc.DENIAL_HEADER)
                if denial:  # e.g. unknown_run (404): also a refusal, not an outage
                    raise BudgetDenied(f"{denial}: {_message(exc)}") from exc
                raise LlmUnavailable(f"HTTP {exc.status_code}: {_message(exc)}") from exc
            except anthropic.APIError as exc:
                raise LlmUnavailable(f"{type(exc).__name__}: {exc}") from exc
            cost = raw.headers.get(COST_HEADER)
            return raw.parse(), (float(cost) if cost else None)

        return create

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self._session.post(self._base + path, json=body, timeout=self._timeout,
                                   headers={"Authorization": f"Bearer {self._token.get()}"})
        except requests.RequestException as exc:
            raise GuardrailsError(f"guardrails {path}: {type(exc).__name__}") from exc
        try:
            data = r.json()
        except ValueError:
            data = {"detail": r.text[:300]}
        if r.status_code >= 300:
            raise GuardrailsError(f"guardrails {path}: HTTP {r.status_code}: {data.get('detail', '')}",
                                  status=r.status_code, body=data)
        return data if isinstance(data, dict) else {"result": data}

    def propose(self, action: dict[str, Any]) -> dict[str, Any]:
        """`POST /v1/actions`: executed, pending approval or denied — guardrails decides."""
        return self._post("/v1/actions", action)

    def escalate(self, escalation: dict[str, Any]) -> dict[str, Any]:
        """`POST /v1/escalations`: a human looks; nothing is written to the target system."""
        return self._post("/v1/escalations", escalation)


def _message(exc: anthropic.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    err = body.get("error") if isinstance(body.get("error"), dict) else body
    return str((err or {}).get("message") or exc.message)[:300]


LlmFactory = Callable[[str], MessagesCreate]
