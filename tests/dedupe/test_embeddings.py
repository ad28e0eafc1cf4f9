"""The ONNX Runtime MiniLM dedupe runs: same vectors as sentence-transformers, batch-independent, cached export."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from services.dedupe.config import load_config
from shared.embeddings import (EmbedderUnavailable, MiniLMEmbedder, MiniLMOptions, OnnxMiniLMEmbedder,
                               make_embedder, model_cache_dir)

pytestmark = pytest.mark.xdist_group("dedupe")

TEXTS = [
    "NullPointerException in FileSystem.getFileStatus when the path does not exist.\nCalling getFileStatus "
    "on a missing path throws java.lang.NullPointerException",
    "Upgrade Netty to 4.1.100 to fix CVE-2023-44487",
    "Payroll export misses overtime hours for night shifts. " * 20,  # longer than the window: truncated
    "YARN ResourceManager web UI shows wrong queue capacity",
]


@pytest.fixture(scope="module")
def onnx() -> OnnxMiniLMEmbedder:
    options = load_config("config").embedding
    assert options.backend == "onnx"
    emb = make_embedder(options)
    assert isinstance(emb, OnnxMiniLMEmbedder)
    return emb


def test_vectors_match_sentence_transformers_fp32(onnx: OnnxMiniLMEmbedder) -> None:
    reference = MiniLMEmbedder(MiniLMOptions(max_tokens=onnx.options.max_tokens, quantize=False, threads=1))
    a, b = onnx.embed(TEXTS), reference.embed(TEXTS)
    assert a.shape == (len(TEXTS), 384) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)
    cos = np.sum(a * b, axis=1)
    assert cos.min() > 0.97, cos  # int8 per-channel weights; per-tensor int8 would be ~0.94
    # and the ranking they imply is the same: each text is nearest to itself across backends
    assert list(np.argmax(a @ b.T, axis=1)) == list(range(len(TEXTS)))


def test_a_vector_does_not_depend_on_its_batch(onnx: OnnxMiniLMEmbedder) -> None:
    alone = onnx.embed(TEXTS[1:2])[0]
    together = onnx.embed(TEXTS)[1]
    assert np.array_equal(alone, together)
    assert onnx.embed([]).shape == (0, 384)


def test_export_is_cached_by_content_hash(onnx: OnnxMiniLMEmbedder) -> None:
    files = sorted(model_cache_dir(onnx.options).glob("all-minilm-l6-v2-int8-*.onnx"))
    assert files, "the exported model is cached outside the repository"
    before = {f: f.stat().st_mtime_ns for f in files}
    again = OnnxMiniLMEmbedder(onnx.options)  # loads the cached file: no second export
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert np.array_equal(again.embed(TEXTS[:1]), onnx.embed(TEXTS[:1]))
    assert again.name == "all-MiniLM-L6-v2/96/onnx-int8" and not str(files[0]).startswith(os.getcwd())


def test_missing_model_or_unknown_backend_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(EmbedderUnavailable, match="does not exist"):
        OnnxMiniLMEmbedder(MiniLMOptions(backend="onnx", model_path=str(tmp_path / "nope"), cache_dir=str(tmp_path)))
    with pytest.raises(EmbedderUnavailable, match="unknown embedding backend"):
        make_embedder(MiniLMOptions(backend="tensorflow"))


def test_concurrent_calls_give_the_same_vectors(onnx: OnnxMiniLMEmbedder) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sequential = [onnx.embed([t])[0] for t in TEXTS * 3]
    with ThreadPoolExecutor(4) as pool:  # no lock around the session: requests in one worker run side by side
        parallel = list(pool.map(lambda t: onnx.embed([t])[0], TEXTS * 3))
    assert all(np.array_equal(a, b) for a, b in zip(sequential, parallel))
