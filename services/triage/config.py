"""Triage configuration: the taxonomy (config/taxonomy.yaml) and the service settings (config/triage.yaml).

Both are validated when the service starts; an invalid file stops it with every error listed by path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,48}$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")  # Jira labels: no spaces


class ConfigError(RuntimeError):
    """A configuration file is missing or invalid; the message lists every problem by path."""


@dataclass(frozen=True)
class TaxonomyValue:
    """One allowed answer for a field (a category, a priority or a component)."""

    id: str
    description: str
    name: str = ""
    labels: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class Taxonomy:
    """What triage may answer: every value the model or the vote can produce is listed here."""

    categories: tuple[TaxonomyValue, ...]
    priorities: tuple[TaxonomyValue, ...]
    components: tuple[TaxonomyValue, ...]
    triage_labels: tuple[str, ...]

    def ids(self, field: str) -> tuple[str, ...]:
        """Allowed ids of `field` ('category', 'priority' or 'component')."""
        return tuple(v.id for v in self.values(field))

    def values(self, field: str) -> tuple[TaxonomyValue, ...]:
        """The taxonomy values of one field."""
        return {"category": self.categories, "priority": self.priorities, "component": self.components}[field]

    def category_label(self, category: str) -> str:
        """The Jira label that marks a ticket with `category` (the first listed)."""
        for value in self.categories:
            if value.id == category:
                return value.labels[0] if value.labels else f"category-{value.id}"
        raise KeyError(category)

    def category_from_labels(self, labels: list[str]) -> list[str]:
        """Categories whose labels appear among a ticket's labels."""
        have = {lb.lower() for lb in labels}
        return [v.id for v in self.categories if any(lb.lower() in have for lb in v.labels)]


@dataclass(frozen=True)
class ForbiddenRule:
    """A request no automation should act on: a match escalates the ticket."""

    id: str
    reason: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Example:
    """A worked example of the LLM prompt: a ticket, its evidence and the expected tool input."""

    ticket: dict[str, Any]
    similar: tuple[dict[str, Any], ...]
    answer: dict[str, Any]


@dataclass(frozen=True)
class TriageConfig:
    """config/triage.yaml, typed."""

    summary_chars: int
    description_chars: int
    evidence_summary_chars: int
    evidence_resolution_chars: int
    resolution_chars: int
    similar_limit: int
    duplicate_limit: int
    defect_issue_types: tuple[str, ...]
    retrieval_timeout: float
    score_power: float
    prior_weight: float
    keyword_weight: float
    conflict_ratio: float
    conflict_min_weight: float
    min_confidence: float
    offline_agreement_min_confidence: float
    poll_enabled: bool
    poll_jql: str
    poll_max_issues: int
    llm_model: str | None
    llm_max_tokens: int
    llm_cache_ttl: str
    llm_max_attempts: int
    llm_max_similar: int
    operations: tuple[str, ...]
    internal_comment: bool
    comment_header: str
    forbidden: tuple[ForbiddenRule, ...]
    examples: tuple[Example, ...]


class _Reader:
    """Collects every problem instead of stopping at the first one."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def get(self, node: Any, path: str, kind: type | tuple[type, ...], *, default: Any = ...,
            minimum: float | None = None, maximum: float | None = None) -> Any:
        parts = path.split(".")
        cur = node
        for part in parts:
            if not isinstance(cur, dict) or part not in cur:
                if default is not ...:
                    return default
                self.problems.append(f"{path}: missing")
                return None
            cur = cur[part]
        if kind is float and isinstance(cur, int) and not isinstance(cur, bool):
            cur = float(cur)
        if cur is None and default is None:
            return None
        if not isinstance(cur, kind) or (isinstance(cur, bool) and kind in (int, float)):
            self.problems.append(f"{path}: expected {getattr(kind, '__name__', kind)}, got {type(cur).__name__}")
            return None
        if minimum is not None and isinstance(cur, (int, float)) and cur < minimum:
            self.problems.append(f"{path}: must be >= {minimum}, got {cur}")
        if maximum is not None and isinstance(cur, (int, float)) and cur > maximum:
            self.problems.append(f"{path}: must be <= {maximum}, got {cur}")
        return cur

    def fail_if_problems(self) -> None:
        if self.problems:
            raise ConfigError(f"invalid {self.source}:\n  - " + "\n  - ".join(self.problems))


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def _values(r: _Reader, doc: Any, field: str, *, with_labels: bool) -> tuple[TaxonomyValue, ...]:
    items = r.get(doc, field, list)
    out: list[TaxonomyValue] = []
    seen: set[str] = set()
    for i, item in enumerate(items or []):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            r.problems.append(f"{where}: expected a mapping")
            continue
        vid = item.get("id")
        if not isinstance(vid, str) or not _ID.match(vid):
            r.problems.append(f"{where}.id: must be a word of letters, digits and '-', got {vid!r}")
            continue
        if vid in seen:
            r.problems.append(f"{where}.id: duplicate {vid!r}")
        seen.add(vid)
        desc = item.get("description")
        if not isinstance(desc, str) or not desc.strip():
            r.problems.append(f"{where}.description: required")
            desc = ""
        labels = item.get("labels", []) if with_labels else []
        if not isinstance(labels, list) or not all(isinstance(x, str) and _LABEL.match(x) for x in labels):
            r.problems.append(f"{where}.labels: must be a list of Jira labels (no spaces)")
            labels = []
        keywords = item.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(x, str) and x.strip() for x in keywords):
            r.problems.append(f"{where}.keywords: must be a list of non-empty strings")
            keywords = []
        out.append(TaxonomyValue(id=vid, description=" ".join(desc.split()), name=str(item.get("name") or vid),
                                 labels=tuple(labels), keywords=tuple(k.lower() for k in keywords)))
    if items is not None and not out:
        r.problems.append(f"{field}: at least one value is required")
    return tuple(out)


def load_taxonomy(path: str | Path) -> Taxonomy:
    """Read and validate config/taxonomy.yaml."""
    path = Path(path)
    doc = _load_yaml(path)
    r = _Reader(str(path))
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    categories = _values(r, doc, "categories", with_labels=True)
    priorities = _values(r, doc, "priorities", with_labels=False)
    components = _values(r, doc, "components", with_labels=False)
    triage_labels = r.get(doc, "triage_labels", list, default=[])
    if not all(isinstance(x, str) and _LABEL.match(x) for x in triage_labels or []):
        r.problems.append("triage_labels: must be a list of Jira labels (no spaces)")
        triage_labels = []
    label_owner: dict[str, str] = {}
    for value in categories:
        for lb in value.labels:
            if lb.lower() in label_owner:
                r.problems.append(f"categories: label {lb!r} used by both {label_owner[lb.lower()]} and {value.id}")
            label_owner[lb.lower()] = value.id
    r.fail_if_problems()
    return Taxonomy(categories, priorities, components, tuple(triage_labels))


def load_triage_config(path: str | Path, taxonomy: Taxonomy) -> TriageConfig:
    """Read and validate config/triage.yaml (its examples are checked against the taxonomy)."""
    path = Path(path)
    doc = _load_yaml(path)
    r = _Reader(str(path))
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    g = r.get
    forbidden: list[ForbiddenRule] = []
    for i, rule in enumerate(g(doc, "forbidden_requests", list) or []):
        where = f"forbidden_requests[{i}]"
        if not isinstance(rule, dict) or not all(isinstance(rule.get(k), str) for k in ("id", "reason", "pattern")):
            r.problems.append(f"{where}: needs string id, reason and pattern")
            continue
        try:
            forbidden.append(ForbiddenRule(rule["id"], rule["reason"], re.compile(rule["pattern"].strip(), re.I)))
        except re.error as exc:
            r.problems.append(f"{where}.pattern: invalid regular expression: {exc}")
    allowed_ops = {"jira.add_comment", "jira.add_labels"}
    operations = g(doc, "proposals.operations", list) or []
    for op in operations:
        if op not in allowed_ops:
            # Code decides what triage may ever propose; config can only narrow it.
            r.problems.append(f"proposals.operations: {op!r} is not one triage can propose ({sorted(allowed_ops)})")
    examples: list[Example] = []
    for i, ex in enumerate(g(doc, "examples", list, default=[]) or []):
        where = f"examples[{i}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("ticket"), dict) or not isinstance(ex.get("answer"), dict):
            r.problems.append(f"{where}: needs ticket and answer mappings")
            continue
        ans = ex["answer"]
        for field in ("category", "priority", "component"):
            if ans.get(field) not in taxonomy.ids(field):
                r.problems.append(f"{where}.answer.{field}: {ans.get(field)!r} is not in the taxonomy")
        similar = ex.get("similar") or []
        keys = {s.get("key") for s in similar if isinstance(s, dict)}
        for ref in ans.get("references") or []:
            if ref not in keys:
                r.problems.append(f"{where}.answer.references: {ref!r} is not one of the example's similar tickets")
        examples.append(Example(ticket=ex["ticket"], similar=tuple(similar), answer=ans))
    model = g(doc, "llm.model", str, default=None)
    cfg = TriageConfig(
        summary_chars=g(doc, "limits.summary_chars", int, minimum=20),
        description_chars=g(doc, "limits.description_chars", int, minimum=100),
        evidence_summary_chars=g(doc, "limits.evidence_summary_chars", int, minimum=20),
        evidence_resolution_chars=g(doc, "limits.evidence_resolution_chars", int, minimum=20),
        resolution_chars=g(doc, "limits.resolution_chars", int, minimum=100),
        similar_limit=g(doc, "retrieval.similar_limit", int, minimum=1, maximum=50),
        duplicate_limit=g(doc, "retrieval.duplicate_limit", int, minimum=1, maximum=50),
        defect_issue_types=tuple(g(doc, "retrieval.defect_issue_types", list) or ()),
        retrieval_timeout=g(doc, "retrieval.timeout_seconds", float, minimum=0.1),
        score_power=g(doc, "vote.score_power", float, minimum=0.0),
        prior_weight=g(doc, "vote.prior_weight", float, minimum=0.0),
        keyword_weight=g(doc, "vote.keyword_weight", float, minimum=0.0),
        conflict_ratio=g(doc, "vote.conflict_ratio", float, minimum=0.0, maximum=1.0),
        conflict_min_weight=g(doc, "vote.conflict_min_weight", float, minimum=0.0),
        min_confidence=g(doc, "escalation.min_confidence", float, minimum=0.0, maximum=1.0),
        offline_agreement_min_confidence=g(doc, "escalation.offline_agreement_min_confidence", float,
                                           minimum=0.0, maximum=1.0),
        poll_enabled=g(doc, "polling.enabled", bool),
        poll_jql=g(doc, "polling.jql", str),
        poll_max_issues=g(doc, "polling.max_issues", int, minimum=1, maximum=1000),
        llm_model=model,
        llm_max_tokens=g(doc, "llm.max_tokens", int, minimum=100, maximum=8192),
        llm_cache_ttl=g(doc, "llm.cache_ttl", str),
        llm_max_attempts=g(doc, "llm.max_attempts", int, minimum=1, maximum=3),
        llm_max_similar=g(doc, "llm.max_similar_in_prompt", int, minimum=0, maximum=20),
        operations=tuple(operations),
        internal_comment=g(doc, "proposals.internal_comment", bool),
        comment_header=g(doc, "proposals.comment_header", str),
        forbidden=tuple(forbidden),
        examples=tuple(examples),
    )
    if cfg.llm_cache_ttl not in ("5m", "1h"):
        r.problems.append(f"llm.cache_ttl: must be 5m or 1h, got {cfg.llm_cache_ttl!r}")
    r.fail_if_problems()
    return cfg


def default_model(config_dir: str | Path, cfg: TriageConfig, task: str = "triage") -> str:
    """The model triage uses: triage.yaml's choice, else the first cheap-tier model policy allows the task."""
    policy = _load_yaml(Path(config_dir) / "policy.yaml")
    try:
        allowed = list(policy["tasks"][task]["models"])
        tiers = dict(policy["models"]["tiers"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"policy.yaml: tasks.{task}.models and models.tiers are required") from exc
    if cfg.llm_model:
        if cfg.llm_model not in allowed:
            raise ConfigError(f"triage.yaml: llm.model {cfg.llm_model!r} is not allowed for task {task!r} "
                              f"by policy.yaml ({allowed})")
        return cfg.llm_model
    for model in allowed:
        if tiers.get(model) == "cheap":
            return str(model)
    raise ConfigError(f"policy.yaml: task {task!r} allows no cheap-tier model")


def load_prices(config_dir: str | Path) -> dict[str, dict[str, float]]:
    """USD per million tokens per model and token kind, from config/prices.yaml."""
    doc = _load_yaml(Path(config_dir) / "prices.yaml")
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        raise ConfigError("prices.yaml: 'models' mapping is required")
    return {str(m): {str(k): float(v) for k, v in kinds.items()} for m, kinds in models.items()}
