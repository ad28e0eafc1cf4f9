"""config/dedupe.yaml: weights, thresholds and limits, validated at start-up with every problem listed."""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from shared.embeddings import MiniLMOptions, minilm_name

from .lexical import Bm25Params
from .verdict import FEATURES, VerdictModel


class ConfigError(RuntimeError):
    """config/dedupe.yaml is missing or invalid."""


@dataclass(frozen=True)
class FusionConfig:
    lexical: float = 0.5
    dense: float = 1.0
    recency: float = 0.04
    pool: int = 200


@dataclass(frozen=True)
class VerdictConfig:
    """Thresholds on the verdict model's probability; the model itself (intercept, weights) is parsed apart."""

    duplicate: float = 0.9
    possible: float = 0.1
    model: VerdictModel = field(default_factory=VerdictModel)
    # The embedder the model was fitted with (its cosines are the model's main input); None: not recorded.
    embedder: str | None = None


@dataclass(frozen=True)
class LlmConfig:
    enabled: bool = False
    model: str = "claude-haiku-4-5"
    max_tokens: int = 400
    top_k: int = 3
    timeout_seconds: float = 20.0
    min_confidence: float = 0.8  # the model's own confidence a "duplicate" needs; below it, "possible"


@dataclass(frozen=True)
class DedupeConfig:
    """Everything tunable about retrieval and verdicts."""

    embedding: MiniLMOptions = field(default_factory=MiniLMOptions)
    embed_max_chars: int = 2000
    lexical: Bm25Params = field(default_factory=Bm25Params)
    description_tokens: int = 400
    fusion: FusionConfig = field(default_factory=FusionConfig)
    verdict: VerdictConfig = field(default_factory=VerdictConfig)
    similar_exclude: frozenset[str] = frozenset()
    llm: LlmConfig = field(default_factory=LlmConfig)
    description_chars_stored: int = 50_000


def _section(raw: Mapping[str, Any], name: str, cls: type, problems: list[str],
             extra: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    data = raw.get(name) or {}
    if not isinstance(data, dict):
        problems.append(f"{name}: must be a mapping")
        return cls(), {}
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for k, v in data.items():
        if k in extra:
            rest[k] = v
        elif k not in known:
            problems.append(f"{name}.{k}: unknown setting")
        else:
            default = getattr(cls(), k)
            if isinstance(default, bool):
                ok = isinstance(v, bool)
            elif isinstance(default, (int, float)):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            else:
                ok = isinstance(v, type(default)) or default is None
            if not ok:
                problems.append(f"{name}.{k}: expected {type(default).__name__}, got {v!r}")
            else:
                kwargs[k] = type(default)(v) if isinstance(default, (int, float)) and not isinstance(default, bool) else v
    return cls(**kwargs), rest


def _verdict_model(rest: Mapping[str, Any], problems: list[str]) -> VerdictModel:
    """verdict.intercept (any number) and verdict.weights (feature name -> any number; at least one)."""
    intercept = rest.get("intercept", 0.0)
    if isinstance(intercept, bool) or not isinstance(intercept, (int, float)):
        problems.append(f"verdict.intercept: expected a number, got {intercept!r}")
        intercept = 0.0
    weights = rest.get("weights")
    if not isinstance(weights, dict) or not weights:
        problems.append("verdict.weights: must map feature names to numbers (at least one); features: "
                        + ", ".join(FEATURES))
        return VerdictModel(float(intercept), {})
    ok: dict[str, float] = {}
    for name, w in weights.items():
        if name not in FEATURES:
            problems.append(f"verdict.weights.{name}: unknown feature (known: {', '.join(FEATURES)})")
        elif isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            problems.append(f"verdict.weights.{name}: expected a number, got {w!r}")
        else:
            ok[name] = float(w)
    return VerdictModel(float(intercept), ok)


def load_config(config_dir: str | Path) -> DedupeConfig:
    """Read <config_dir>/dedupe.yaml; raise ConfigError naming every bad path."""
    path = Path(config_dir) / "dedupe.yaml"
    if not path.is_file():
        root_path = Path(__file__).resolve().parents[2] / "config" / "dedupe.yaml"
        if not root_path.is_file():
            raise ConfigError(f"{path} not found")
        path = root_path
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    problems: list[str] = []
    for key in raw:
        if key not in {"embedding", "lexical", "fusion", "verdict", "similar", "llm", "limits"}:
            problems.append(f"{key}: unknown section")
    emb_raw = dict(raw.get("embedding") or {})
    provider = emb_raw.pop("provider", "minilm")
    if provider != "minilm":
        problems.append(f"embedding.provider: only 'minilm' is implemented, got {provider!r}")
    max_chars = emb_raw.pop("max_chars", 2000)
    embedding, _ = _section({"embedding": emb_raw}, "embedding", MiniLMOptions, problems)
    lex_raw = dict(raw.get("lexical") or {})
    description_tokens = lex_raw.pop("description_tokens", 400)
    lexical, _ = _section({"lexical": lex_raw}, "lexical", Bm25Params, problems)
    fusion, _ = _section(raw, "fusion", FusionConfig, problems)
    verdict, verdict_rest = _section(raw, "verdict", VerdictConfig, problems, extra=("intercept", "weights"))
    verdict = replace(verdict, model=_verdict_model(verdict_rest, problems))
    llm, _ = _section(raw, "llm", LlmConfig, problems)
    if not 0 <= llm.min_confidence <= 1:
        problems.append(f"llm.min_confidence: must be between 0 and 1, got {llm.min_confidence!r}")
    if not 0 <= verdict.possible <= verdict.duplicate <= 1:
        problems.append("verdict: need 0 <= possible <= duplicate <= 1 (thresholds on a probability)")
    if verdict.embedder is not None and not isinstance(verdict.embedder, str):
        problems.append(f"verdict.embedder: expected the embedder's name, got {verdict.embedder!r}")
    elif verdict.embedder is not None and verdict.embedder != minilm_name(embedding):
        # Another window, backend or precision moves every cosine: the old weights would misjudge silently.
        problems.append(f"verdict.embedder: the verdict model was fitted with {verdict.embedder}, but the "
                        f"embedding settings give {minilm_name(embedding)}; refit it (`metis dedupe evaluate "
                        "--calibrate`) and paste its verdict section, or set embedding back")
    similar = raw.get("similar") or {}
    exclude = similar.get("exclude_resolutions", []) if isinstance(similar, dict) else None
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        problems.append("similar.exclude_resolutions: must be a list of strings")
        exclude = []
    limits = raw.get("limits") or {}
    stored = limits.get("description_chars_stored", 50_000) if isinstance(limits, dict) else 50_000
    for name, value in (("embedding.max_chars", max_chars), ("lexical.description_tokens", description_tokens),
                        ("limits.description_chars_stored", stored)):
        if not isinstance(value, int) or value <= 0:
            problems.append(f"{name}: must be a positive integer, got {value!r}")
    if problems:
        raise ConfigError(f"invalid {path}:\n  - " + "\n  - ".join(problems))
    return DedupeConfig(embedding=embedding, embed_max_chars=max_chars, lexical=lexical,
                        description_tokens=description_tokens, fusion=fusion, verdict=verdict,
                        similar_exclude=frozenset(x.lower() for x in exclude), llm=llm,
                        description_chars_stored=stored)


def copy_with_llm_enabled(source: str | Path, dest: str | Path) -> Path:
    """A copy of a configuration directory with dedupe's LLM verification switched on (`llm.enabled: true`;
    the service also needs METIS_DEDUPE_LLM=on and a run id per call). Returns `dest`."""
    dest = Path(dest)
    shutil.copytree(source, dest, dirs_exist_ok=True)
    raw = yaml.safe_load((dest / "dedupe.yaml").read_text()) or {}
    raw.setdefault("llm", {})["enabled"] = True
    (dest / "dedupe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    load_config(dest)  # the copy must still be a valid configuration
    return dest
