"""The narrative's LLM: the official anthropic SDK through the guardrails gateway, for one run."""
from __future__ import annotations

from typing import Callable

import anthropic

from shared.guardrails_client import BudgetDenied, GuardrailsClient, GuardrailsError
from shared.settings import Settings

from .config import NarrativeConfig
from .narrative import LLM, LLMDenied, LLMFailed


class GatewayLLM:
    """Completes one prompt with the configured cheap model; denials and failures become typed errors."""

    def __init__(self, client: anthropic.Anthropic, model: str) -> None:
        self._client = client
        self.model = model

    def complete(self, *, system: str, prompt: str, max_tokens: int) -> str:
        """The model's text; raises LLMDenied (budget / policy / kill switch) or LLMFailed."""
        try:
            msg = self._client.messages.create(model=self.model, max_tokens=max_tokens, system=system,
                                               messages=[{"role": "user", "content": prompt}])
        except BudgetDenied as exc:
            raise LLMDenied(exc.reason) from exc
        except GuardrailsError as exc:
            raise LLMFailed(f"{exc.code}: {exc}") from exc
        except anthropic.APIStatusError as exc:
            raise LLMFailed(f"HTTP {exc.status_code}") from exc
        except anthropic.APIError as exc:
            raise LLMFailed(type(exc).__name__) from exc
        if msg.stop_reason == "max_tokens":
            raise LLMFailed("the model ran out of tokens")
        return "".join(getattr(b, "text", "") for b in msg.content if getattr(b, "type", "") == "text")


def gateway_llm_factory(settings: Settings, cfg: NarrativeConfig) -> Callable[[str | None], tuple[LLM | None, str]]:
    """run id → an LLM for that run, or None and why (no run, no token for the gateway)."""
    def for_run(run_id: str | None) -> tuple[LLM | None, str]:
        if not run_id:
            return None, "no run id: the gateway only serves calls inside a guardrails run"
        if not settings.own_token:
            return None, "no METIS_TOKEN_DIGEST for the gateway"
        client = GuardrailsClient.from_settings(settings).anthropic(run_id, max_retries=1,
                                                                    timeout=cfg.timeout_seconds)
        return GatewayLLM(client, cfg.model), ""
    return for_run
