"""Models the Anthropic emulator accepts, with the limits that shape its behaviour.

Minimum cacheable prompt lengths follow Anthropic's prompt-caching documentation (checked against the
docs' model table and reports quoting it): 4096 for Opus 4.5 / 4.6 and Haiku 4.5, 2048 for Opus 4.7 and
Haiku 3 / 3.5, 1024 for Sonnet 4.x / Opus 4 / 4.1 / 4.8 / Sonnet 3.7 / Sonnet 5, 512 for the 5-series
Opus / Fable / Mythos. Values marked "unverified" are guesses for ids the SDK lists but the docs seen
here did not cover.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """One model id's limits."""

    id: str
    display_name: str
    min_cacheable_tokens: int
    max_output_tokens: int
    context_window: int = 200_000


def _m(ids: tuple[str, ...], name: str, min_cache: int, max_out: int, ctx: int = 200_000) -> list[ModelInfo]:
    return [ModelInfo(i, name, min_cache, max_out, ctx) for i in ids]


_ALL: list[ModelInfo] = [
    *_m(("claude-3-haiku-20240307",), "Claude Haiku 3", 2048, 4096),
    *_m(("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"), "Claude Haiku 3.5", 2048, 8192),
    *_m(("claude-3-7-sonnet-20250219", "claude-3-7-sonnet-latest"), "Claude Sonnet 3.7", 1024, 64000),
    *_m(("claude-sonnet-4-20250514", "claude-sonnet-4-0"), "Claude Sonnet 4", 1024, 64000),
    *_m(("claude-opus-4-20250514", "claude-opus-4-0"), "Claude Opus 4", 1024, 32000),
    *_m(("claude-opus-4-1-20250805", "claude-opus-4-1"), "Claude Opus 4.1", 1024, 32000),
    *_m(("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"), "Claude Sonnet 4.5", 1024, 64000),
    *_m(("claude-haiku-4-5-20251001", "claude-haiku-4-5"), "Claude Haiku 4.5", 4096, 64000),
    *_m(("claude-opus-4-5-20251101", "claude-opus-4-5"), "Claude Opus 4.5", 4096, 64000),
    *_m(("claude-opus-4-6",), "Claude Opus 4.6", 4096, 128000),
    *_m(("claude-sonnet-4-6",), "Claude Sonnet 4.6", 1024, 64000),
    *_m(("claude-opus-4-7",), "Claude Opus 4.7", 2048, 128000),
    *_m(("claude-opus-4-8",), "Claude Opus 4.8", 1024, 128000),
    *_m(("claude-sonnet-5",), "Claude Sonnet 5", 1024, 128000),
    *_m(("claude-opus-5",), "Claude Opus 5", 512, 128000),
    *_m(("claude-fable-5", "claude-fable-5-1", "claude-fable-5-2"), "Claude Fable 5", 512, 128000),
    *_m(("claude-mythos-5", "claude-mythos-5-1", "claude-mythos-5-2", "claude-mythos-preview"), "Claude Mythos 5", 512, 128000),
    # unverified minimums (SDK lists the ids; the documentation seen here did not):
    *_m(("claude-haiku-5-5",), "Claude Haiku 5.5", 1024, 64000),
    *_m(("claude-sonnet-5-5",), "Claude Sonnet 5.5", 1024, 128000),
    *_m(("claude-opus-5-5",), "Claude Opus 5.5", 512, 128000),
]

# Retired upstream (past end-of-life per the SDK's deprecation table): the API answers 404 for them.
RETIRED = frozenset({"claude-3-7-sonnet-20250219", "claude-3-7-sonnet-latest", "claude-3-5-haiku-20241022",
                     "claude-3-5-haiku-latest", "claude-opus-4-0", "claude-opus-4-20250514", "claude-sonnet-4-0",
                     "claude-sonnet-4-20250514", "claude-mythos-preview"})

MODELS: dict[str, ModelInfo] = {m.id: m for m in _ALL if m.id not in RETIRED}


def lookup(model: str) -> ModelInfo | None:
    """The model's limits, or None for an unknown id (the API answers 404 not_found_error)."""
    return MODELS.get(model)
