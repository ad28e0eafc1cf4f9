"""The embedder pattern detection uses: dedupe's local MiniLM (offline), from shared/embeddings.py."""
from __future__ import annotations

from shared.embeddings import Embedder, MiniLMEmbedder, MiniLMOptions


def load_embedder() -> Embedder:
    """MiniLM, int8, over the first 64 tokens: pattern texts are summaries (Jira caps them at 255
    characters, ~60 tokens), and short windows with batches of 64 embed them fastest on this CPU."""
    return MiniLMEmbedder(MiniLMOptions(max_tokens=64, batch_size=64))
