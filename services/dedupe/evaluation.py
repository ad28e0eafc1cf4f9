"""Duplicate-detection evaluation through the service's HTTP API (the path production uses).

Protocol (Zhang et al., TOSEM 2023, as in the gitbugs README): for each duplicate pair the later report
is the query and only reports created before it are searched. Reports in no pair are queried too, to
measure how often "duplicate" is said where there is none. Queries are split in time: the first half
(development) is what thresholds are calibrated on, the second half (test) is only measured.
"""
from __future__ import annotations

import csv
import math
import re
import statistics
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import requests

from shared.guardrails_client import BudgetDenied, GuardrailsClient

from .verdict import VerdictModel, decide, fit_logistic, out_of_fold

# The verdict model's inputs, chosen on the development split (see benchmarks/dedupe_eval.md, "Verdicts").
DEFAULT_FEATURES = ("cosine", "margin")

DATE_FORMATS = ("%d/%b/%y %H:%M", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d")


def _parse_time(value: str) -> datetime:
    for fmt in DATE_FORMATS:
        try:
            d = datetime.strptime(value.strip(), fmt)
            return d if d.tzinfo else d.replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise ValueError(f"unrecognised date {value!r}")


@dataclass
class Dataset:
    tickets: list[dict[str, Any]]                     # API shape, oldest first
    queries: list[tuple[str, set[str]]]               # (later report's key, earlier duplicates' keys)
    negatives: list[str]                              # keys of reports with no duplicate at all
    by_key: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_dataset(issues_csv: Path, pairs_csv: Path, *, prefix: str = "GB") -> Dataset:
    """Read the gitbugs CSV format (Summary, Issue id, Status, Priority, Resolution, Created, ..., Description)."""
    tickets: list[dict[str, Any]] = []
    with open(issues_csv, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            created = _parse_time(row["Created"])
            tickets.append({"key": f"{prefix}-{row['Issue id'].strip()}", "summary": row["Summary"] or "(no summary)",
                            "description": row.get("Description") or "", "created": created.isoformat(),
                            "status": row.get("Status") or None, "resolution": row.get("Resolution") or None,
                            "priority": row.get("Priority") or None, "_t": created})
    tickets.sort(key=lambda t: t["_t"])
    by_key = {t["key"]: t for t in tickets}
    links: dict[str, set[str]] = defaultdict(set)
    with open(pairs_csv, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        for pair in reader:
            if len(pair) < 2:
                continue
            a = f"{prefix}-{pair[0].strip()}"
            # a cell may list several ids ("13547000, 13396667")
            for b_id in re.split(r"[,\s]+", pair[1].strip()):
                b = f"{prefix}-{b_id}"
                if b_id and a in by_key and b in by_key:
                    links[a].add(b)
                    links[b].add(a)
    queries = []
    for a, others in links.items():
        earlier = {b for b in others if by_key[b]["_t"] < by_key[a]["_t"]}
        if earlier:
            queries.append((a, earlier))
    queries.sort(key=lambda q: by_key[q[0]]["_t"])
    # Reports with no duplicate; those resolved "Duplicate" may duplicate something outside the set.
    negatives = [t["key"] for t in tickets[len(tickets) // 10:]
                 if t["key"] not in links and (t["resolution"] or "").lower() != "duplicate"]
    return Dataset(tickets, queries, negatives, by_key)


@dataclass
class QueryResult:
    key: str
    split: str
    kind: str                 # "dup" or "neg"
    rank: int | None          # rank of the first true duplicate (None: not in the list)
    verdict: str
    confidence: float
    top_correct: bool
    latency_ms: float
    features: dict[str, float] = field(default_factory=dict)   # the verdict model's inputs, best candidate
    top_key: str | None = None
    mode: str = "offline"     # "llm" when the model verified the candidates (the response's mode)
    named: str | None = None  # the ticket an LLM-confirmed "duplicate" names (not always the best candidate)
    named_correct: bool | None = None  # whether `named` is a true duplicate (None: no LLM-named ticket)
    cost_usd: float | None = None      # what guardrails charged the query's run (with --llm)


def _api_ticket(t: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in t.items() if not k.startswith("_")}


def _problem_code(r: requests.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


class Client:
    """The dedupe HTTP API with a bearer token."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def post(self, path: str, body: dict[str, Any], *, ready_wait: float = 180.0) -> dict[str, Any]:
        """POST and decode; a worker still loading its model or index (503 not_ready) is waited for, briefly."""
        deadline = time.monotonic() + ready_wait
        while True:
            r = self.session.post(self.base_url + path, json=body, timeout=300)
            if r.status_code != 503 or time.monotonic() > deadline or _problem_code(r) != "not_ready":
                break
            time.sleep(1.0)  # /readyz answered from one gunicorn worker; another may still be loading
        if r.status_code >= 400:
            raise RuntimeError(f"POST {path} → {r.status_code}: {r.text[:500]}")
        return r.json()  # type: ignore[no-any-return]

    def get(self, path: str) -> dict[str, Any]:
        r = self.session.get(self.base_url + path, timeout=60)
        if r.status_code >= 400:
            raise RuntimeError(f"GET {path} → {r.status_code}: {r.text[:500]}")
        return r.json()  # type: ignore[no-any-return]

    def delete(self, path: str) -> None:
        self.session.delete(self.base_url + path, timeout=60)


def index_dataset(client: Client, data: Dataset, project: str, *, batch: int = 64, concurrency: int = 1,
                  progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Upsert every ticket (project-tagged so the evaluation never mixes with real tickets); time it.

    `concurrency` batches are in flight at once, as a back-fill or several n8n executions would send them,
    so every gunicorn worker embeds.
    """
    chunks = [[{**_api_ticket(t), "project": project} for t in data.tickets[i:i + batch]]
              for i in range(0, len(data.tickets), batch)]

    def send(chunk: list[dict[str, Any]]) -> int:
        n = int(client.post("/v1/tickets", {"tickets": chunk})["embedded"])
        if progress:
            progress(len(chunk))
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        embedded = sum(pool.map(send, chunks))
    dt = time.perf_counter() - t0
    return {"tickets": len(data.tickets), "embedded": embedded, "seconds": round(dt, 2),
            "tickets_per_second": round(len(data.tickets) / dt, 1), "concurrency": concurrency}


class GuardrailsRuns:
    """One guardrails run per query (task `dedupe`, trigger `manual`), so the service may verify with the LLM
    through the gateway exactly as the n8n flow does; what guardrails charged each run is read back."""

    def __init__(self, base_url: str, token: str, *, task: str = "dedupe") -> None:
        self.client = GuardrailsClient(base_url, token, timeout=30.0)
        self.task = task
        self.refusals: dict[str, int] = defaultdict(int)

    def open(self, external_id: str) -> str | None:
        """A run id, or None when guardrails refuses the run (kill switch, an exhausted cap): counted, and the
        query then runs without one (offline verdict), so a budget stop never passes for a model's judgement."""
        try:
            return self.client.open_run(self.task, trigger="manual", workflow="metis dedupe evaluate",
                                        external_id=external_id).id
        except BudgetDenied as exc:
            self.refusals[exc.reason] += 1
            return None

    def finish(self, run_id: str, outcome: dict[str, Any], *, status: str = "succeeded") -> float:
        """Close the run; what it cost in USD."""
        return float(self.client.finish_run(run_id, status, outcome).budget.get("spent_usd") or 0.0)


def run_queries(client: Client, data: Dataset, project: str, *, negatives: int | None = None,
                progress: Callable[[int], None] | None = None,
                runs: GuardrailsRuns | None = None) -> list[QueryResult]:
    """Query every pair's later report (and the negatives) with only earlier reports eligible.

    With `runs`, each query carries a guardrails run of its own, so a service with LLM verification on asks the
    model about its "possible" candidates, and the result records the mode and what the run cost.
    """
    half = len(data.queries) // 2
    split_time = data.by_key[data.queries[half][0]]["_t"] if data.queries else None
    jobs: list[tuple[str, str, set[str]]] = [(k, "dup", rel) for k, rel in data.queries]
    negs = data.negatives
    if negatives is not None and negatives < len(negs):
        step = len(negs) / negatives  # an even spread over time, deterministic
        negs = [negs[int(i * step)] for i in range(negatives)]
    jobs += [(k, "neg", set()) for k in negs]
    out: list[QueryResult] = []
    for key, kind, rel in jobs:
        t = data.by_key[key]
        body = {"ticket": {**_api_ticket(t), "project": project}, "limit": 100, "created_before": t["created"],
                "filters": {"project": [project]}}
        run_id = runs.open(f"eval:{key}") if runs else None
        if run_id:
            body["run_id"] = run_id
        t0 = time.perf_counter()
        try:
            res = client.post("/v1/duplicates", body)
        except Exception as exc:
            if runs and run_id:  # never leave a run open behind an aborted evaluation
                runs.finish(run_id, {"ticket": key, "error": str(exc)[:300]}, status="failed")
            raise
        ms = (time.perf_counter() - t0) * 1000
        cost = runs.finish(run_id, {"ticket": key, "verdict": res["verdict"], "mode": res.get("mode")}) \
            if runs and run_id else None
        keys = [c["key"] for c in res["candidates"]]
        rank = next((i + 1 for i, k in enumerate(keys) if k in rel), None)
        split = "dev" if split_time is None or t["_t"] < split_time else "test"
        # The ticket a confirmed "duplicate" names (a hesitant answer below llm.min_confidence stays "possible").
        named = (res.get("llm") or {}).get("duplicate_of") \
            if res.get("mode") == "llm" and res["verdict"] == "duplicate" else None
        out.append(QueryResult(key, split, kind, rank, res["verdict"], float(res["confidence"]),
                               bool(keys) and keys[0] in rel, ms, dict(res.get("features") or {}),
                               keys[0] if keys else None, mode=str(res.get("mode") or "offline"), named=named,
                               named_correct=(named in rel) if named else None, cost_usd=cost))
        if progress:
            progress(1)
    return out


def ranking_metrics(results: Iterable[QueryResult]) -> dict[str, float]:
    """Recall-rate@1/5/10 and MAP (one relevant report per query here, so AP = 1/rank)."""
    rs = [r for r in results if r.kind == "dup"]
    n = max(len(rs), 1)
    m = {f"RR@{k}": round(sum(1 for r in rs if r.rank is not None and r.rank <= k) / n, 3) for k in (1, 5, 10)}
    m["MAP"] = round(sum(1 / r.rank for r in rs if r.rank) / n, 3)
    m["queries"] = len(rs)
    return m


def verdict_metrics(results: Iterable[QueryResult], duplicate: float | None = None,
                    possible: float | None = None) -> dict[str, float]:
    """Precision / recall of "duplicate" (a hit = the top candidate is a true duplicate, or for an LLM-confirmed
    "duplicate" the ticket the model named) and false-duplicate rates.

    With thresholds given, verdicts are recomputed from the confidences (for calibration); else the service's.
    Precision "all reports" counts every "duplicate" said, on duplicate queries and on reports with none.
    """
    rs = list(results)

    def said(r: QueryResult, level: str) -> bool:
        if duplicate is None:
            return r.verdict == "duplicate" if level == "duplicate" else r.verdict in ("duplicate", "possible")
        v = decide(r.confidence, duplicate, possible if possible is not None else duplicate)
        return v == "duplicate" if level == "duplicate" else v != "none"

    dups = [r for r in rs if r.kind == "dup"]
    negs = [r for r in rs if r.kind == "neg"]
    out: dict[str, float] = {}

    def hit(r: QueryResult, level: str) -> bool:
        if level == "duplicate" and duplicate is None and r.named_correct is not None:
            return r.named_correct
        return r.top_correct

    for level in ("duplicate", "possible"):
        on_dups = [r for r in dups if said(r, level)]
        correct = sum(hit(r, level) for r in on_dups)
        false_neg = sum(said(r, level) for r in negs)
        name = "dup" if level == "duplicate" else "possible_or_dup"
        out[f"{name}_precision_on_dup_queries"] = round(correct / len(on_dups), 3) if on_dups else float("nan")
        out[f"{name}_recall"] = round(correct / max(len(dups), 1), 3)
        out[f"{name}_false_rate_on_no_duplicate"] = round(false_neg / max(len(negs), 1), 4)
        total_said = len(on_dups) + false_neg
        out[f"{name}_precision_all_reports"] = round(correct / total_said, 3) if total_said else float("nan")
        out[f"{name}_said"] = total_said
        out[f"{name}_correct"] = correct
        out[f"{name}_said_on_no_duplicate"] = false_neg
    out["duplicate_queries"] = len(dups)
    out["no_duplicate_reports"] = len(negs)
    return out


def _label(r: QueryResult) -> int:
    """What the verdict model predicts: the best candidate is a true duplicate of the query."""
    return int(r.kind == "dup" and r.top_correct)


def _time_folds(rs: list[QueryResult], folds: int) -> list[int]:
    """Blocks of time: duplicate queries and no-duplicate reports (each in time order) cut into `folds` blocks."""
    out: list[int] = []
    seen = {"dup": 0, "neg": 0}
    total = {k: sum(1 for r in rs if r.kind == k) for k in seen}
    for r in rs:
        out.append(min(folds - 1, seen[r.kind] * folds // max(total[r.kind], 1)))
        seen[r.kind] += 1
    return out


def calibrate(results: list[QueryResult], *, features: Sequence[str] = DEFAULT_FEATURES,
              target_precision: float = 0.9, min_said: int = 3, possible_false_rate: float = 0.2,
              l2: float = 1.0, folds: int = 5) -> dict[str, Any]:
    """The verdict model and its thresholds, from the development split only.

    model: logistic regression of "the best candidate is a true duplicate" on `features`, over every
    development report (duplicate queries and reports with none). duplicate: the lowest probability at
    which "duplicate" is right >= target_precision of the time over *all* development reports, said at
    least min_said times, judged on out-of-fold probabilities (time blocks, so the model never grades
    reports it was fitted on); if no threshold reaches it, 1.0: the offline verdict never says
    "duplicate" and only an LLM confirmation can. possible: the lowest probability at which
    "possible or duplicate" fires on at most possible_false_rate of development reports with no duplicate.
    """
    dev = [r for r in results if r.split == "dev"]
    if not dev or any(not r.features for r in dev):
        raise ValueError("calibration needs development results with the service's verdict features")
    rows, labels = [r.features for r in dev], [_label(r) for r in dev]
    model = fit_logistic(rows, labels, features, l2=l2)
    oof = out_of_fold(rows, labels, _time_folds(dev, max(2, min(folds, sum(labels)))), features, l2=l2)
    dup_t, best = 1.0, None
    ranked = sorted(((p, y) for p, y in zip(oof, labels) if p == p), key=lambda t: -t[0])
    correct = 0
    for i, (p, y) in enumerate(ranked):
        correct += y
        said = i + 1
        if i + 1 < len(ranked) and ranked[i + 1][0] == p:
            continue  # a threshold takes every report at its probability
        if said >= min_said and correct / said >= target_precision:
            dup_t, best = p, {"said": said, "correct": correct}
    probs = sorted((model.probability(r.features) for r in dev if r.kind == "neg"), reverse=True)
    allowed = int(possible_false_rate * len(probs))
    # just above the first report not allowed (rounded up, so the stored threshold keeps the promise)
    pos_t = math.ceil((probs[allowed] + 1e-9) * 1e4) / 1e4 if allowed < len(probs) else 0.0
    pos_t = min(pos_t, dup_t)
    return {"features": list(features), "l2": l2, **model.as_config(), "duplicate": round(dup_t, 4),
            "possible": round(pos_t, 4), "duplicate_reachable_on_dev": best is not None,
            "dev_out_of_fold_at_duplicate": best,
            "dev_out_of_fold_top20": "".join("X" if y else "." for _, y in ranked[:20])}


def rescored(results: Iterable[QueryResult], model: VerdictModel) -> list[QueryResult]:
    """The results with the confidence a different verdict model would give (the features are the service's)."""
    return [replace(r, confidence=model.probability(r.features)) for r in results]


def latency_summary(results: list[QueryResult]) -> dict[str, float]:
    lat = sorted(r.latency_ms for r in results)
    if not lat:
        return {}
    return {"p50_ms": round(statistics.median(lat), 1), "p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 1),
            "n": len(lat)}


def llm_summary(results: list[QueryResult], refusals: dict[str, int] | None = None) -> dict[str, Any]:
    """With --llm: how many queries the model verified, what it said, how often it was right, what it cost."""
    out: dict[str, Any] = {"run_refusals": dict(refusals or {})}
    for split in ("all", "dev", "test"):
        rs = [r for r in results if split == "all" or r.split == split]
        verified = [r for r in rs if r.mode == "llm"]
        named = [r for r in verified if r.named]
        right = sum(bool(r.named_correct) for r in named)
        costs = sorted(r.cost_usd for r in rs if r.cost_usd)
        out[split] = {"queries": len(rs), "verified": len(verified), "charged": len(costs),
                      "said_duplicate": len(named), "named_a_true_duplicate": right,
                      "precision_of_llm_duplicates": round(right / len(named), 3) if named else None,
                      "cost_usd_total": round(sum(costs), 6),
                      "cost_usd_median_per_charged_query": round(statistics.median(costs), 6) if costs else None}
    return out


def report(index_stats: dict[str, float], results: list[QueryResult],
           calibrated: dict[str, Any] | None = None, *, llm_refusals: dict[str, int] | None = None,
           llm: bool = False) -> dict[str, Any]:
    """Everything the command prints, as one JSON-able dict."""
    out: dict[str, Any] = {"indexing": index_stats, "latency": latency_summary(results), "ranking": {},
                           "verdict": {}, "results": [r.__dict__ for r in results]}
    if llm:
        out["llm"] = llm_summary(results, llm_refusals)
    for split in ("all", "dev", "test"):
        rs = [r for r in results if split == "all" or r.split == split]
        out["ranking"][split] = ranking_metrics(rs)
        out["verdict"][split] = verdict_metrics(rs)
    if calibrated is not None:
        out["calibrated_on_dev"] = calibrated
        model = VerdictModel(calibrated["intercept"], calibrated["weights"])
        rs = rescored(results, model)
        out["verdict_with_calibrated"] = {s: verdict_metrics([r for r in rs if s == "all" or r.split == s],
                                                             calibrated["duplicate"], calibrated["possible"])
                                          for s in ("dev", "test")}
        for s in ("dev", "test"):  # the 20 most confident reports, X = the best candidate is a true duplicate
            top = sorted((r for r in rs if r.split == s), key=lambda r: -r.confidence)[:20]
            out["verdict_with_calibrated"][s]["top20"] = "".join("X" if _label(r) else "." for r in top)
    return out


def markdown(rep: dict[str, Any]) -> str:
    """The ranking table and the key figures as Markdown."""
    lines = ["| split | queries | RR@1 | RR@5 | RR@10 | MAP |", "|---|---|---|---|---|---|"]
    for split, m in rep["ranking"].items():
        lines.append(f"| {split} | {m['queries']} | {m['RR@1']:.3f} | {m['RR@5']:.3f} | {m['RR@10']:.3f} | {m['MAP']:.3f} |")
    lines.append("")
    lines.append("| split | dup precision (dup queries) | dup recall | false dup on no-dup reports | "
                 "dup precision (all reports) | possible+dup recall |")
    lines.append("|---|---|---|---|---|---|")
    for split, m in rep["verdict"].items():
        lines.append(f"| {split} | {m['dup_precision_on_dup_queries']} | {m['dup_recall']} | "
                     f"{m['dup_false_rate_on_no_duplicate']} | {m['dup_precision_all_reports']} | "
                     f"{m['possible_or_dup_recall']} |")
    lines.append("")
    if "llm" in rep:
        lines.append("| split (--llm) | verified by the LLM | charged (verified or failed) | it said duplicate | "
                     "named a true duplicate | precision | cost (USD) |")
        lines.append("|---|---|---|---|---|---|---|")
        for split in ("all", "dev", "test"):
            m = rep["llm"][split]
            lines.append(f"| {split} | {m['verified']} of {m['queries']} | {m['charged']} | {m['said_duplicate']} | "
                         f"{m['named_a_true_duplicate']} | {m['precision_of_llm_duplicates']} | {m['cost_usd_total']} |")
        if rep["llm"]["run_refusals"]:
            lines.append(f"runs refused by guardrails (those queries kept the offline verdict): "
                         f"{rep['llm']['run_refusals']}")
        lines.append("")
    ix, lat = rep["indexing"], rep["latency"]
    lines.append(f"indexing: {ix['tickets']} tickets in {ix['seconds']} s = {ix['tickets_per_second']} tickets/s "
                 f"over HTTP; query latency p50 {lat.get('p50_ms')} ms, p95 {lat.get('p95_ms')} ms (n={lat.get('n')})")
    if "calibrated_on_dev" in rep:
        c = rep["calibrated_on_dev"]
        lines.append(f"verdict model fitted on the development split: intercept {c['intercept']}, weights "
                     f"{c['weights']}; thresholds duplicate {c['duplicate']}, possible {c['possible']}"
                     + ("" if c["duplicate_reachable_on_dev"] else
                        f" (precision >= target not reachable on dev: offline \"duplicate\" disabled)"))
        lines.append("")
        lines.append("config/dedupe.yaml, section verdict (the model is tied to the embedder: refit when it changes):")
        lines.append("```yaml")
        lines.append(f"  intercept: {c['intercept']}")
        lines.append("  weights: {" + ", ".join(f"{k}: {v}" for k, v in c["weights"].items()) + "}")
        lines.append(f"  duplicate: {c['duplicate']}")
        lines.append(f"  possible: {c['possible']}")
        if c.get("embedder"):
            lines.append(f"  embedder: {c['embedder']}")
        lines.append("```")
        lines.append("")
        lines.append("| split (calibrated model) | dup said | correct | on no-dup | precision all reports | "
                     "possible+dup recall | possible+dup false rate |")
        lines.append("|---|---|---|---|---|---|---|")
        for split, m in rep["verdict_with_calibrated"].items():
            lines.append(f"| {split} | {m['dup_said']} | {m['dup_correct']} | {m['dup_said_on_no_duplicate']} | "
                         f"{m['dup_precision_all_reports']} | {m['possible_or_dup_recall']} | "
                         f"{m['possible_or_dup_false_rate_on_no_duplicate']} |")
    return "\n".join(lines)
