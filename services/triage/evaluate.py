"""Evaluation of the offline classifier on a labelled CSV, through dedupe's HTTP API (the production path).

Protocol (time-ordered, like production: only tickets created before a query can be its neighbours):
rows are sorted by creation time; the last `test_fraction` are the test queries, the `dev_fraction`
before them the development queries (used to choose vote parameters), and every row is indexed in
dedupe under a throw-away project so that each query searches only earlier tickets of this CSV.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import requests
from urllib.parse import quote

from .config import Taxonomy, TriageConfig
from .service import classify_offline, evidence_from_similar, normalize_ticket, vote

DATE_FORMATS = ("%d/%b/%y %H:%M", "%d/%b/%Y %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d")
LABEL_PREFIX = "evallabel:"


@dataclass(frozen=True)
class Row:
    """One labelled ticket of the CSV."""

    key: str
    summary: str
    description: str
    label: str
    created: datetime
    status: str | None
    resolution: str | None


def parse_date(value: str) -> datetime | None:
    """Jira CSV exports ("30/Sep/21 17:20") and ISO dates; naive times are UTC."""
    value = (value or "").strip()
    for fmt in DATE_FORMATS:
        try:
            d = datetime.strptime(value, fmt)
        except ValueError:
            continue
        return d if d.tzinfo else d.replace(tzinfo=timezone.utc)
    try:
        d = datetime.fromisoformat(value)
        return d if d.tzinfo else d.replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def read_rows(path: Path, *, text_columns: Sequence[str], label_column: str, key_column: str | None,
              created_column: str | None, status_column: str | None,
              resolution_column: str | None) -> tuple[list[Row], int]:
    """Labelled rows (first text column = summary, the others = description) and how many were skipped."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in [*text_columns, label_column] if c not in header]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; the header has {header}")
        rows: list[Row] = []
        skipped = 0
        for i, rec in enumerate(reader):
            label = (rec.get(label_column) or "").strip()
            if created_column is None:
                # Without dates, file order stands for time.
                created: datetime | None = datetime.fromtimestamp(946684800 + i * 60, tz=timezone.utc)
            else:
                created = parse_date(rec.get(created_column) or "")
            if not label or created is None:
                skipped += 1
                continue
            summary = (rec.get(text_columns[0]) or "").strip()
            description = "\n\n".join((rec.get(c) or "").strip() for c in text_columns[1:])
            key = (rec.get(key_column) or "").strip() if key_column else ""
            rows.append(Row(key=key or str(i + 1), summary=summary or "(no summary)", description=description,
                            label=label, created=created,
                            status=(rec.get(status_column) or None) if status_column else "Resolved",
                            resolution=(rec.get(resolution_column) or None) if resolution_column else "Done"))
    rows.sort(key=lambda r: (r.created, r.key))
    return rows, skipped


def split(rows: Sequence[Row], test_fraction: float, dev_fraction: float) -> tuple[list[Row], list[Row]]:
    """(development queries, test queries): the two most recent slices."""
    n = len(rows)
    n_test = max(1, int(round(n * test_fraction)))
    n_dev = max(1, int(round(n * dev_fraction)))
    return list(rows[n - n_test - n_dev: n - n_test]), list(rows[n - n_test:])


# ---------------------------------------------------------------------------------------------- metrics

def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over `labels`, per-label precision / recall / F1 and the confusion matrix."""
    none = "(none)"
    pred = [p if p is not None else none for p in y_pred]
    confusion = {t: {p: 0 for p in [*labels, none]} for t in labels}
    for t, p in zip(y_true, pred):
        confusion[t][p if p in confusion[t] else none] += 1
    per: dict[str, dict[str, float]] = {}
    f1s: list[float] = []
    for lb in labels:
        tp = confusion[lb][lb]
        fp = sum(confusion[t][lb] for t in labels if t != lb)
        fn = sum(v for p, v in confusion[lb].items() if p != lb)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        per[lb] = {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "support": tp + fn}
    n = len(y_true)
    return {"n": n, "accuracy": round(sum(t == p for t, p in zip(y_true, pred)) / n, 4) if n else 0.0,
            "macro_f1": round(sum(f1s) / len(f1s), 4) if f1s else 0.0,
            "per_label": per, "confusion": confusion}


def calibration(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and a reliability table: is a 0.7 confidence right 70 % of the time?"""
    table = []
    ece = 0.0
    n = len(confidences)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if not idx:
            continue
        acc = sum(correct[i] for i in idx) / len(idx)
        conf = sum(confidences[i] for i in idx) / len(idx)
        ece += len(idx) / n * abs(acc - conf)
        table.append({"bin": f"{lo:.1f}-{hi:.1f}", "n": len(idx), "mean_confidence": round(conf, 3),
                      "accuracy": round(acc, 3)})
    return {"ece": round(ece, 4), "table": table}


def selective(confidences: Sequence[float], correct: Sequence[bool], threshold: float) -> dict[str, Any]:
    """What triage would propose at the escalation threshold: coverage and accuracy of those proposals."""
    kept = [ok for c, ok in zip(confidences, correct) if c >= threshold]
    return {"threshold": threshold, "coverage": round(len(kept) / len(correct), 4) if correct else 0.0,
            "accuracy": round(sum(kept) / len(kept), 4) if kept else None}


# ---------------------------------------------------------------------------------------------- the run

class DedupeHttp:
    """Index and search through dedupe's HTTP API with a bearer token."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self.base = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def _post(self, path: str, body: dict[str, Any], ready_wait: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + ready_wait
        while True:
            r = self.session.post(self.base + path, json=body, timeout=self.timeout)
            # A freshly started dedupe answers 503 until its embedding model is loaded: wait, bounded.
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if r.status_code != 200:
            raise RuntimeError(f"dedupe {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()  # type: ignore[no-any-return]

    def upsert(self, tickets: list[dict[str, Any]]) -> None:
        """POST /v1/tickets in one batch."""
        self._post("/v1/tickets", {"tickets": tickets})

    def similar(self, ticket: dict[str, Any], limit: int, filters: dict[str, Any]) -> list[dict[str, Any]]:
        """POST /v1/similar -> candidates."""
        return list(self._post("/v1/similar", {"ticket": ticket, "limit": limit, "filters": filters})["candidates"])

    def delete(self, key: str) -> None:
        """DELETE /v1/tickets/{key}."""
        r = self.session.delete(f"{self.base}/v1/tickets/{quote(key, safe='')}", timeout=self.timeout)
        if r.status_code not in (204, 404):
            raise RuntimeError(f"dedupe DELETE {key}: HTTP {r.status_code}")


def _eval_project(path: Path) -> str:
    return "EVAL" + hashlib.sha256(path.read_bytes()).hexdigest()[:8].upper()


def _as_dedupe_ticket(row: Row, project: str, field: str) -> dict[str, Any]:
    t: dict[str, Any] = {"key": f"{project}-{row.key}", "summary": row.summary, "description": row.description,
                         "created": row.created.isoformat(), "status": row.status, "resolution": row.resolution,
                         "project": project, "labels": [LABEL_PREFIX + row.label.replace(" ", "_")]}
    if field == "priority":
        t["priority"] = row.label
    return t


@dataclass(frozen=True)
class VoteParams:
    """The knobs of the offline vote that the development split may choose."""

    k: int
    score_power: float
    prior_weight: float


def predict(row: Row, neighbours: list[dict[str, Any]], params: VoteParams, *, field: str, labels: Sequence[str],
            taxonomy: Taxonomy, cfg: TriageConfig) -> tuple[str | None, float]:
    """The offline classifier's answer for one query: the production vote on the label's field."""
    cfg2 = dataclasses.replace(cfg, score_power=params.score_power, prior_weight=params.prior_weight)
    evidence = evidence_from_similar(neighbours[: params.k], taxonomy)
    if field == "priority" and set(labels) <= set(taxonomy.ids("priority")):
        ticket = normalize_ticket({"key": "EVAL-1", "summary": row.summary, "description": row.description}, cfg2)
        fv = classify_offline(ticket, evidence, taxonomy, cfg2).priority
        return fv.value, fv.confidence
    by_key = {n["key"]: n for n in neighbours}
    ballots = []
    for ev in evidence:
        w = max(ev.score, 0.0) ** params.score_power
        for lb in by_key[ev.key].get("labels") or []:
            if isinstance(lb, str) and lb.startswith(LABEL_PREFIX):
                ballots.append((lb[len(LABEL_PREFIX):], w, ev.key))
    fv2 = vote(ballots, [lb.replace(" ", "_") for lb in labels], cfg2)
    value = fv2.value
    if value is not None:
        value = {lb.replace(" ", "_"): lb for lb in labels}[value]
    return value, fv2.confidence


def evaluate(*, csv_path: Path, text_columns: Sequence[str], label_column: str, dedupe: DedupeHttp,
             taxonomy: Taxonomy, cfg: TriageConfig, key_column: str | None = None, created_column: str | None = None,
             status_column: str | None = None, resolution_column: str | None = None, field: str | None = None,
             test_fraction: float = 0.2, dev_fraction: float = 0.2, tune: bool = True, keep_index: bool = False,
             progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Index the CSV in dedupe, query dev and test rows time-ordered, and score the offline vote."""
    rows, skipped = read_rows(csv_path, text_columns=text_columns, label_column=label_column, key_column=key_column,
                              created_column=created_column, status_column=status_column,
                              resolution_column=resolution_column)
    if len(rows) < 10:
        raise ValueError(f"{csv_path}: only {len(rows)} labelled rows; need at least 10")
    field = field or ("priority" if label_column.lower() == "priority" else "label")
    counts = Counter(r.label for r in rows)
    labels = sorted(counts, key=lambda lb: (taxonomy.ids("priority").index(lb)
                                            if lb in taxonomy.ids("priority") else 99, -counts[lb], lb))
    project = _eval_project(csv_path)
    dev, test = split(rows, test_fraction, dev_fraction)
    progress(f"indexing {len(rows)} rows in dedupe as project {project}")
    batch = 200
    for i in range(0, len(rows), batch):
        dedupe.upsert([_as_dedupe_ticket(r, project, field) for r in rows[i:i + batch]])
    k_max = 20
    neighbours: dict[str, list[dict[str, Any]]] = {}
    try:
        for j, row in enumerate([*dev, *test]):
            if j % 100 == 0:
                progress(f"querying {j}/{len(dev) + len(test)}")
            q = {"key": f"{project}-{row.key}", "summary": row.summary, "description": row.description,
                 "created": row.created.isoformat()}
            neighbours[row.key] = dedupe.similar(q, k_max, {"project": [project],
                                                            "created_before": row.created.isoformat()})
    finally:
        if not keep_index:
            progress("removing the evaluation tickets from dedupe")
            for r in rows:
                dedupe.delete(f"{project}-{r.key}")

    def score(split_rows: Sequence[Row], params: VoteParams) -> dict[str, Any]:
        preds = [predict(r, neighbours[r.key], params, field=field, labels=labels, taxonomy=taxonomy, cfg=cfg)
                 for r in split_rows]
        y_true = [r.label for r in split_rows]
        y_pred = [p for p, _ in preds]
        m = classification_metrics(y_true, y_pred, labels)
        conf = [c for _, c in preds]
        correct = [t == p for t, p in zip(y_true, y_pred)]
        m["calibration"] = calibration(conf, correct)
        m["at_threshold"] = selective(conf, correct, cfg.min_confidence)
        return m

    configured = VoteParams(cfg.similar_limit, cfg.score_power, cfg.prior_weight)
    result: dict[str, Any] = {
        "csv": str(csv_path), "label_column": label_column, "field": field, "rows": len(rows),
        "skipped_unlabelled": skipped, "labels": {lb: counts[lb] for lb in labels},
        "split": {"dev": len(dev), "test": len(test), "dev_from": dev[0].created.isoformat(),
                  "test_from": test[0].created.isoformat(), "test_to": test[-1].created.isoformat()},
        "configured_params": dataclasses.asdict(configured),
        "test": score(test, configured),
    }
    majority = counts.most_common(1)[0][0]
    result["baseline_majority"] = {k: v for k, v in classification_metrics(
        [r.label for r in test], [majority] * len(test), labels).items() if k in ("accuracy", "macro_f1")}
    result["baseline_majority"]["label"] = majority
    if tune:
        grid = [VoteParams(k, p, w) for k in (3, 5, 8, 12, 20) for p in (0.0, 1.0, 2.0, 4.0)
                for w in (0.1, 0.35, 1.0)]
        # Chosen on the development split only: macro-F1 first (the classes are imbalanced), then accuracy.
        best = max(grid, key=lambda prm: (lambda m: (m["macro_f1"], m["accuracy"]))(score(dev, prm)))
        dev_best = score(dev, best)
        result["tuned"] = {"params": dataclasses.asdict(best),
                           "dev": {k: dev_best[k] for k in ("accuracy", "macro_f1")},
                           "test": score(test, best)}
    return result


def render(result: dict[str, Any]) -> str:
    """A human-readable report of `evaluate`'s result."""
    out = [f"Offline triage classifier on {result['csv']} — label column {result['label_column']!r} "
           f"({result['rows']} labelled rows, {result['skipped_unlabelled']} unlabelled skipped)",
           f"time-ordered split: dev {result['split']['dev']} rows, test {result['split']['test']} rows "
           f"({result['split']['test_from'][:10]} … {result['split']['test_to'][:10]}); neighbours: earlier tickets only",
           "labels: " + ", ".join(f"{k} {v}" for k, v in result["labels"].items()), ""]

    def block(title: str, m: dict[str, Any]) -> None:
        out.append(f"{title}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} (n={m['n']})")
        labels = list(m["per_label"])
        cols = [*labels, "(none)"]
        width = max(8, *(len(c) for c in cols))
        out.append("  confusion (rows = true, columns = predicted):")
        out.append("  " + " " * width + "".join(f"{c:>{width + 1}}" for c in cols))
        for t in labels:
            out.append(f"  {t:<{width}}" + "".join(f"{m['confusion'][t][p]:>{width + 1}}" for p in cols))
        out.append("  per label: " + "; ".join(f"{lb} P {v['precision']:.2f} R {v['recall']:.2f} F1 {v['f1']:.2f}"
                                               for lb, v in m["per_label"].items()))
        cal = m["calibration"]
        out.append(f"  calibration: ECE {cal['ece']:.3f}; " + ", ".join(
            f"{b['bin']}: n={b['n']} conf {b['mean_confidence']:.2f} acc {b['accuracy']:.2f}" for b in cal["table"]))
        th = m["at_threshold"]
        acc = "n/a" if th["accuracy"] is None else f"{th['accuracy']:.3f}"
        out.append(f"  at the escalation threshold {th['threshold']:.2f}: proposes for {th['coverage']:.1%} of "
                   f"tickets, accuracy of those {acc}")

    block(f"configured vote {result['configured_params']}", result["test"])
    b = result["baseline_majority"]
    out.append(f"baseline (always {b['label']!r}): accuracy {b['accuracy']:.3f}, macro-F1 {b['macro_f1']:.3f}")
    if "tuned" in result:
        t = result["tuned"]
        out.append("")
        out.append(f"tuned on dev {t['params']} (dev accuracy {t['dev']['accuracy']:.3f}, "
                   f"macro-F1 {t['dev']['macro_f1']:.3f}); on test:")
        block("tuned vote", t["test"])
    return "\n".join(out)


def iter_columns(value: str) -> Iterable[str]:
    """'Summary,Description' -> ['Summary', 'Description']."""
    return [c.strip() for c in value.split(",") if c.strip()]

