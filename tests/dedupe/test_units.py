"""Pure parts: text cleaning and tokens, the BM25F index, configuration validation, metrics."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.dedupe.config import ConfigError, load_config
from services.dedupe.evaluation import QueryResult, calibrate, ranking_metrics, verdict_metrics
from services.dedupe.lexical import Bm25Params, LexicalIndex
from services.dedupe.text import clean, for_embedding, tokens
from shared.embeddings import content_hash


def test_clean_removes_controls_and_lone_surrogates() -> None:
    assert clean("a\x00b\x07c\r\nd \ud800 e\u202e") == "a b c\nd ? e"
    assert clean(None) == ""


def test_tokens_split_code_identifiers_and_keep_versions() -> None:
    toks = tokens("NPE in org.apache.hadoop.fs.FileSystem.getFileStatus; upgrade jackson-databind to 2.9.10.3")
    assert {"filesystem", "file", "system", "getfilestatus", "status", "2.9.10.3", "npe", "jackson"} <= set(toks)
    assert "org" not in toks and "apache" not in toks  # packages say little
    assert tokens("failed failing fails") == ["fail", "fail", "fail"]


def test_embedding_text_drops_noise_and_truncates() -> None:
    text = for_embedding("Summary", "see https://x.org/a {code}int x = 1;{code}\n" + "\tat a.B.c(B.java:1)\n" * 20
                         + "z" * 5000, max_chars=300)
    assert text.startswith("Summary.") and "https://" not in text and "{code}" not in text
    assert text.count("at a.B.c") == 3 and len(text) == 300


def test_lexical_incremental_equals_rebuilt() -> None:
    docs = {i: (tokens(f"disk {w} failure on node {i}"), tokens(f"details {w} {i % 3}"))
            for i, w in enumerate(["full", "slow", "full", "corrupt", "missing", "full"])}
    inc = LexicalIndex(Bm25Params(), merge_at=2)
    for slot, (s, d) in docs.items():
        inc.put(slot, s, d)
        inc.score(["disk"], [], 10)  # forces segment builds between changes
    inc.remove(1)
    inc.put(3, tokens("network partition"), [])
    ref = LexicalIndex(Bm25Params())
    for slot, (s, d) in docs.items():
        if slot == 1:
            continue
        ref.put(slot, *((tokens("network partition"), []) if slot == 3 else (s, d)))
    ref.compact()
    inc.compact()
    q = tokens("disk full failure")
    assert np.allclose(inc.score(q, [], 10), ref.score(q, [], 10))
    scores = ref.score(q, [], 10)
    assert scores[1] == 0 and scores[3] == 0 and scores[0] > scores[4]


def test_summary_terms_outweigh_description_terms() -> None:
    ix = LexicalIndex(Bm25Params(w_summary=5.0))
    ix.put(0, tokens("quota exceeded"), tokens("unrelated words here"))
    ix.put(1, tokens("unrelated words here"), tokens("quota exceeded"))
    ix.put(2, tokens("something else"), tokens("nothing"))
    s = ix.score(tokens("quota exceeded"), [], 3)
    assert s[0] > s[1] > 0 == s[2]


def test_config_lists_every_problem(tmp_path: Path) -> None:
    (tmp_path / "dedupe.yaml").write_text("fusion: {dense: -1, bogus: 2}\nverdict: {duplicate: 0.2, possible: 0.5}\n"
                                          "colour: red\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    msg = str(err.value)
    assert "fusion.dense" in msg and "fusion.bogus" in msg and "verdict" in msg and "colour" in msg
    cfg = load_config("config")
    assert cfg.verdict.possible <= cfg.verdict.duplicate and 32 <= cfg.embedding.max_tokens <= 256


def test_content_hash_separates_parts() -> None:
    assert content_hash("ab", "c") != content_hash("a", "bc")
    assert content_hash("x") == content_hash("x")


def _r(kind: str, rank: int | None, conf: float, split: str = "dev", verdict: str = "none") -> QueryResult:
    return QueryResult("k", split, kind, rank, verdict, conf, rank == 1, 1.0)


def test_metrics_and_calibration() -> None:
    rs = [_r("dup", 1, 0.95), _r("dup", 3, 0.6), _r("dup", None, 0.4), _r("dup", 1, 0.9),
          _r("neg", None, 0.97), *[_r("neg", None, 0.3) for _ in range(200)]]
    m = ranking_metrics(rs)
    assert m["RR@1"] == 0.5 and m["RR@5"] == 0.75 and m["MAP"] == round((1 + 1 / 3 + 1) / 4, 3)
    v = verdict_metrics(rs, 0.9, 0.5)
    assert v["dup_precision_on_dup_queries"] == 1.0 and v["dup_recall"] == 0.5
    assert v["dup_false_rate_on_no_duplicate"] == round(1 / 201, 4)
    t = calibrate(rs, target_precision=0.9, max_false_rate=0.01)
    assert t["duplicate"] == 0.9  # lowest threshold meeting precision on dup queries and the false-rate cap
