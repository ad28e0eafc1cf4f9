"""The embedder pattern detection uses: dedupe's local MiniLM (offline, shared/embeddings.py), run as
several single-threaded copies side by side."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from shared.embeddings import Embedder, MiniLMEmbedder, MiniLMOptions

# Pattern texts are summaries (Jira caps them at 255 characters, ~60 tokens): a 64-token window loses
# nothing, and short sequences in batches of 64 embed fastest on this CPU.
OPTIONS = MiniLMOptions(max_tokens=64, batch_size=64, threads=1)


class ParallelEmbedder:
    """N copies of MiniLM, one thread each, each embedding a share of the texts. For short texts one thread
    per copy beats one copy spread over every core (measured 1.6-2x on 2 cores): the per-batch matrices are
    too small for intra-op threads to pay off, while torch releases the GIL inside each forward pass."""

    def __init__(self, copies: int) -> None:
        self.copies = max(1, copies)
        with ThreadPoolExecutor(self.copies) as pool:  # load the copies in parallel too
            self._models: list[MiniLMEmbedder] = list(pool.map(lambda _: MiniLMEmbedder(OPTIONS),
                                                               range(self.copies)))
        self._pool = ThreadPoolExecutor(self.copies, thread_name_prefix="digest-embed")

    @property
    def name(self) -> str:
        return self._models[0].name

    @property
    def dim(self) -> int:
        return self._models[0].dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts; shares are dealt by length so every copy gets a similar amount of work."""
        if len(texts) < 2 * OPTIONS.batch_size or self.copies == 1:
            return self._models[0].embed(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        shares = [order[k::self.copies] for k in range(self.copies)]
        results = list(self._pool.map(lambda args: args[0].embed([texts[i] for i in args[1]]),
                                      zip(self._models, shares)))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for share, vecs in zip(shares, results):
            out[share] = vecs
        return out


def load_embedder() -> Embedder:
    """One copy per core (METIS_DIGEST_EMBED_COPIES overrides), at most four."""
    copies = int(os.environ.get("METIS_DIGEST_EMBED_COPIES") or min(4, os.cpu_count() or 1))
    return ParallelEmbedder(copies)
