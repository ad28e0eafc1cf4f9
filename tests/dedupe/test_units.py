"""Pure parts: text cleaning and tokens, the BM25F index, configuration validation, metrics."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.dedupe.config import ConfigError, load_config
from services.dedupe.evaluation import QueryResult, calibrate, llm_summary, ranking_metrics, verdict_metrics
from services.dedupe.verdict import (FEATURES, Evidence, VerdictModel, decide, features, fit_logistic,
                                     summary_versions)
from services.dedupe.lexical import Bm25Params, LexicalIndex
from services.dedupe.text import clean, for_embedding, tokens
from shared.embeddings import MiniLMEmbedder, MiniLMOptions, OnnxMiniLMEmbedder, content_hash, minilm_name


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


def _r(kind: str, rank: int | None, conf: float, split: str = "dev", verdict: str = "none",
       features: dict[str, float] | None = None) -> QueryResult:
    return QueryResult("k", split, kind, rank, verdict, conf, rank == 1, 1.0, features or {})


def test_an_llm_duplicate_is_scored_on_the_ticket_the_model_named() -> None:
    """The LLM may confirm the second candidate: right when that one is a true duplicate even if the best
    candidate is not, wrong when it names a ticket that is not even if the best candidate is."""
    def llm(kind: str, rank: int | None, named_correct: bool | None, verdict: str = "duplicate",
            cost: float | None = 0.001) -> QueryResult:
        return replace(_r(kind, rank, 0.5, verdict=verdict), mode="llm", named="X" if named_correct is not None
                       else None, named_correct=named_correct, cost_usd=cost)

    rs = [llm("dup", 2, True),            # named the true duplicate ranked second: right
          llm("dup", 1, False),           # named another candidate while the best was right: wrong
          llm("neg", None, False),        # a report with no duplicate: wrong
          llm("dup", 1, None, "possible"),  # verified, no duplicate found
          _r("dup", 1, 0.2, verdict="none")]  # never verified (offline "none")
    m = verdict_metrics(rs)
    assert (m["dup_said"], m["dup_correct"], m["dup_said_on_no_duplicate"]) == (3, 1, 1)
    assert m["dup_precision_all_reports"] == round(1 / 3, 3) and m["dup_recall"] == 0.25
    assert m["possible_or_dup_correct"] == 2  # "possible" still judges the best candidate (ranks 1, 1 said)
    s = llm_summary(rs, {"kill_switch_engaged": 2})
    assert s["all"] == {"queries": 5, "verified": 4, "charged": 4, "said_duplicate": 3, "named_a_true_duplicate": 1,
                        "precision_of_llm_duplicates": 0.333, "cost_usd_total": 0.004,
                        "cost_usd_median_per_charged_query": 0.001}
    assert s["run_refusals"] == {"kill_switch_engaged": 2}


def test_metrics() -> None:
    rs = [_r("dup", 1, 0.95), _r("dup", 3, 0.6), _r("dup", None, 0.4), _r("dup", 1, 0.9),
          _r("neg", None, 0.97), *[_r("neg", None, 0.3) for _ in range(200)]]
    m = ranking_metrics(rs)
    assert m["RR@1"] == 0.5 and m["RR@5"] == 0.75 and m["MAP"] == round((1 + 1 / 3 + 1) / 4, 3)
    v = verdict_metrics(rs, 0.9, 0.5)
    assert v["dup_precision_on_dup_queries"] == 1.0 and v["dup_recall"] == 0.5
    assert v["dup_false_rate_on_no_duplicate"] == round(1 / 201, 4)
    assert (v["dup_said"], v["dup_correct"], v["dup_said_on_no_duplicate"]) == (3, 2, 1)
    assert v["dup_precision_all_reports"] == round(2 / 3, 3)  # the report without a duplicate counts against it
    assert v["possible_or_dup_said"] == 4 and v["possible_or_dup_correct"] == 2
    never = verdict_metrics(rs, 1.0, 0.5)  # a duplicate threshold of 1: the offline verdict never says it
    assert never["dup_said"] == 0 and never["possible_or_dup_said"] == 4


def test_verdict_features_of_the_leader_and_the_runner_up() -> None:
    ev = [Evidence(1.30, 0.91, 1.4, 0.93, 1.0, 2.0, "Upgrade Jetty to 9.4.44"),
          Evidence(0.90, 0.80, 0.5, 0.93, 0.4, None, "Jetty upgrade to 9.4.39 for CVE")]
    top = features(ev, 0, "Upgrade jetty to 9.4.39")
    assert set(top) == set(FEATURES)
    assert top["margin"] == pytest.approx(0.40) and top["lexical_self"] == 1.0  # capped
    assert top["dense_gap"] == pytest.approx(0.02) and top["lexical_gap"] == 0.0
    assert top["log_days"] == pytest.approx(np.log1p(2.0)) and top["version_conflict"] == 1.0
    assert top["summary_overlap"] == pytest.approx(2 / 4)  # {upgrade, jetty} of {upgrade, jetty, 9.4.39, 9.4.44}
    second = features(ev, 1, "Upgrade jetty to 9.4.39")
    assert second["margin"] == pytest.approx(-0.40) and second["version_conflict"] == 0.0
    assert second["lexical_gap"] == pytest.approx(0.6) and second["log_days"] == 0.0
    assert summary_versions("bump to v1.2 and hadoop-3.4.0-SNAPSHOT, not 10") == {"1.2", "3.4.0"}


def test_decide_and_the_logistic_fit() -> None:
    assert decide(0.99, 1.0, 0.2) == "possible" and decide(0.95, 0.9, 0.2) == "duplicate"
    assert decide(0.1, 0.9, 0.2) == "none"
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] * 3 + rng.normal(size=400) > 2.5).astype(int)  # only the first feature matters
    model = fit_logistic([{"a": a, "b": b} for a, b in x], list(y), ["a", "b"])
    assert model.weights["a"] > 1.5 and abs(model.weights["b"]) < 0.5 * model.weights["a"]
    assert model.probability({"a": 2.0, "b": 0.0}) > 0.5 > model.probability({"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError):
        fit_logistic([{"a": 1.0}], [1], ["a"])  # no negative example


def _dev_set(n_neg: int, noisy_top: int, rng: np.random.Generator, split: str = "dev") -> list[QueryResult]:
    """Duplicate queries with a high cosine, reports without one lower; `noisy_top` of them above every duplicate."""
    out = [_r("dup", 1, 0.5, split, features={"cosine": 0.8 + 0.1 * rng.random(), "margin": 0.5})
           for _ in range(30)]
    out += [_r("neg", None, 0.1, split, features={"cosine": 0.3 + 0.4 * rng.random(), "margin": 0.1})
            for _ in range(n_neg - noisy_top)]
    out += [_r("neg", None, 0.1, split, features={"cosine": 0.99, "margin": 0.6}) for _ in range(noisy_top)]
    return out


def test_calibration_fits_on_dev_and_picks_thresholds() -> None:
    rng = np.random.default_rng(3)
    results = _dev_set(300, 0, rng) + _dev_set(300, 50, rng, split="test")  # the test split must not matter
    c = calibrate(results, features=("cosine", "margin"))
    assert c["duplicate_reachable_on_dev"] and c["duplicate"] < 1.0 and c["weights"]["cosine"] > 0
    model = VerdictModel(c["intercept"], c["weights"])
    dev = [replace(r, confidence=model.probability(r.features)) for r in results if r.split == "dev"]
    m = verdict_metrics(dev, c["duplicate"], c["possible"])
    assert m["dup_precision_all_reports"] >= 0.9 and m["dup_said"] >= 3
    assert m["possible_or_dup_false_rate_on_no_duplicate"] <= 0.2
    assert c == calibrate(_dev_set(300, 0, np.random.default_rng(3)) + _dev_set(300, 0, rng, "test"),
                          features=("cosine", "margin"))


def test_calibration_disables_an_unreachable_duplicate_verdict() -> None:
    # The most confident reports carry no labelled duplicate: no threshold reaches 0.9 precision.
    c = calibrate(_dev_set(300, 40, np.random.default_rng(5)), features=("cosine", "margin"))
    assert c["duplicate"] == 1.0 and not c["duplicate_reachable_on_dev"]
    assert 0 < c["possible"] < 1.0
    with pytest.raises(ValueError):
        calibrate([_r("dup", 1, 0.5)])  # results without the service's features cannot be calibrated


def test_config_verdict_model_is_validated(tmp_path: Path) -> None:
    (tmp_path / "dedupe.yaml").write_text("verdict: {intercept: -3.5, weights: {cosine: 4, colour: 1, margin: x},"
                                          " duplicate: 1.0, possible: 0.05}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert "verdict.weights.colour" in str(err.value) and "verdict.weights.margin" in str(err.value)
    (tmp_path / "dedupe.yaml").write_text("verdict: {intercept: -3.5, weights: {cosine: 4}, duplicate: 0.9, "
                                          "possible: 0.05}\n")
    model = load_config(tmp_path).verdict.model
    assert model.intercept == -3.5 and model.weights == {"cosine": 4.0}
    (tmp_path / "dedupe.yaml").write_text("verdict: {intercept: 1, duplicate: 0.9, possible: 0.05}\n")
    with pytest.raises(ConfigError, match="verdict.weights"):
        load_config(tmp_path)


def test_llm_min_confidence_is_a_probability(tmp_path: Path) -> None:
    (tmp_path / "dedupe.yaml").write_text("llm: {min_confidence: 1.5}\n")
    with pytest.raises(ConfigError, match="llm.min_confidence: must be between 0 and 1"):
        load_config(tmp_path)
    (tmp_path / "dedupe.yaml").write_text("llm: {min_confidence: 0.9}\nverdict: {intercept: -7, weights: {cosine: 4}}\n")
    assert load_config(tmp_path).llm.min_confidence == 0.9
    assert load_config(Path(__file__).resolve().parents[2] / "config").llm.min_confidence == 0.8


def test_a_verdict_model_fitted_with_another_embedder_is_refused(tmp_path: Path) -> None:
    """Changing the embedding window, backend or precision moves every cosine the verdict model reads: the
    service must not start with weights fitted on other vectors (it would misjudge without a word)."""
    verdict = "verdict: {intercept: -7, weights: {cosine: 4}, duplicate: 1.0, possible: 0.05, embedder: %s}\n"
    (tmp_path / "dedupe.yaml").write_text("embedding: {backend: onnx, max_tokens: 96}\n"
                                          + verdict % "all-MiniLM-L6-v2/96/onnx-int8")
    assert load_config(tmp_path).verdict.embedder == "all-MiniLM-L6-v2/96/onnx-int8"
    for embedding in ("{backend: onnx, max_tokens: 128}", "{backend: torch, max_tokens: 96}",
                      "{backend: onnx, max_tokens: 96, quantize: false}"):
        (tmp_path / "dedupe.yaml").write_text(f"embedding: {embedding}\n" + verdict % "all-MiniLM-L6-v2/96/onnx-int8")
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path)
        assert "verdict.embedder" in str(err.value) and "all-MiniLM-L6-v2/96/onnx-int8" in str(err.value)
        assert "metis dedupe evaluate --calibrate" in str(err.value)
    (tmp_path / "dedupe.yaml").write_text("embedding: {max_tokens: 96}\n" + verdict % "[1, 2]")
    with pytest.raises(ConfigError, match="verdict.embedder"):
        load_config(tmp_path)
    # The shipped configuration records the embedder it was fitted with, and it is the one configured.
    shipped = load_config(Path(__file__).resolve().parents[2] / "config")
    assert shipped.verdict.embedder == minilm_name(shipped.embedding)


def test_embedders_are_named_as_their_options_say() -> None:
    """The name the config check compares is the name stored with every vector."""
    for backend, quantize in (("onnx", True), ("onnx", False), ("torch", True), ("torch", False)):
        o = MiniLMOptions(backend=backend, quantize=quantize, max_tokens=64)
        cls = OnnxMiniLMEmbedder if backend == "onnx" else MiniLMEmbedder
        unloaded = cls.__new__(cls)  # the name needs only the options, not the model
        unloaded.options = o
        assert unloaded.name == minilm_name(o)
    assert minilm_name(MiniLMOptions(backend="onnx", max_tokens=96)) == "all-MiniLM-L6-v2/96/onnx-int8"
    assert minilm_name(MiniLMOptions(backend="torch", max_tokens=128, quantize=False)) == "all-MiniLM-L6-v2/128/fp32"
