"""The embedder pattern detection uses: dedupe's local MiniLM (offline), from shared/embeddings.py."""
from __future__ import annotations

from shared.embeddings import Embedder, MiniLMEmbedder, MiniLMOptions


def load_embedder() -> Embedder:
    """MiniLM at 128 tokens, int8 — the same vectors dedupe indexes with, so the cache is comparable."""
    return MiniLMEmbedder(MiniLMOptions())
