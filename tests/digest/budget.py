"""Spend a task's daily budget down through the real gateway, so the next LLM call is denied by budget."""
from __future__ import annotations

import uuid
from typing import Any

import requests

from shared.guardrails_client import GuardrailsClient
from tests.conftest import TEST_TOKENS

HAIKU = "claude-haiku-4-5"
HAIKU_OUT_MICROS = 5  # $5 per million output tokens (config/prices.yaml)


def task_remaining(guardrails_url: str, task: str) -> int:
    """Micro-USD left today on the task's daily cap."""
    r = requests.get(f"{guardrails_url}/v1/budgets", headers={"Authorization": f"Bearer {TEST_TOKENS['ops'].get()}"},
                     timeout=10)
    r.raise_for_status()
    cap = next(c for c in r.json()["caps"] if c["scope"] == "task_daily" and c["task"] == task)
    return int(cap["remaining_micros"])


def spend_down(guardrails_url: str, emu: Any, *, task: str = "digest", leave_micros: int = 1000) -> int:
    """Make real (emulated) LLM calls as `task` until between leave_micros and leave_micros + 1,500 remain."""
    gr = GuardrailsClient(guardrails_url, TEST_TOKENS[task])
    remaining = task_remaining(guardrails_url, task)
    while remaining - leave_micros >= 1500:
        run = gr.open_run(task, trigger="manual", workflow="test-spend-down", external_id=uuid.uuid4().hex)
        llm = gr.anthropic(run.id, max_retries=0)
        for _ in range(3):  # three calls of ~$0.30 stay inside the per-run cap
            spendable = remaining - leave_micros - 1000  # margin for the request's input bound
            if spendable < 500:
                break
            out = min(60_000, spendable // HAIKU_OUT_MICROS)
            emu.script_anthropic([{"match": "spend-down", "text": "ok",
                                   "usage": {"input_tokens": 0, "output_tokens": out,
                                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                                             "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                                                "ephemeral_1h_input_tokens": 0}}}])
            llm.messages.create(model=HAIKU, max_tokens=out, messages=[{"role": "user", "content": "spend-down"}])
            remaining = task_remaining(guardrails_url, task)
        gr.finish_run(run.id, "succeeded")
    return remaining
