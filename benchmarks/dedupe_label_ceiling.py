"""How precise can any "duplicate" verdict be on gitbugs-hadoop, as scored by its own duplicate labels?

Reads the per-report results of an evaluation run through HTTP (`metis dedupe evaluate --out ...`, default
benchmarks/results/dedupe_eval_verdict.json) and the dataset, and counts the reports whose best candidate is a
near-copy of them: the same summary (case and punctuation ignored), and optionally the same description too.
Any judge that says "duplicate" for a report filed twice with the same summary and description (a person, an
LLM, or a threshold) is scored wrong by the labels whenever the dataset does not list that pair, so the share
of labelled pairs among those near-copies bounds the precision such a judge can show on this dataset.

    .venv/bin/python benchmarks/dedupe_label_ceiling.py [--results FILE] [--out FILE]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop"


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", (text or "").lower()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "dedupe_eval_verdict.json")
    ap.add_argument("--issues", type=Path, default=DATA / "issues.csv")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dedupe_label_ceiling.json")
    args = ap.parse_args()
    with open(args.issues, newline="", encoding="utf-8", errors="replace") as f:
        rows = {r["Issue id"].strip(): r for r in csv.DictReader(f)}
    results: list[dict[str, Any]] = json.loads(args.results.read_text())["results"]

    def raw_id(key: str | None) -> str:
        return (key or "").rsplit("-", 1)[-1]

    groups: dict[str, list[dict[str, Any]]] = {"same summary": [], "same summary and description": []}
    for r in results:
        q, c = rows.get(raw_id(r["key"])), rows.get(raw_id(r.get("top_key")))
        if not q or not c or norm(q["Summary"]) != norm(c["Summary"]):
            continue
        item = {"query": raw_id(r["key"]), "candidate": raw_id(r.get("top_key")), "split": r["split"],
                "labelled_duplicate": bool(r["top_correct"]), "summary": q["Summary"],
                "query_resolution": q["Resolution"] or None, "candidate_resolution": c["Resolution"] or None}
        groups["same summary"].append(item)
        if norm(q["Description"]) == norm(c["Description"]) and norm(q["Description"]):
            groups["same summary and description"].append(item)
    report: dict[str, Any] = {"results_file": str(args.results.relative_to(ROOT)) if args.results.is_relative_to(ROOT)
                              else str(args.results), "reports_evaluated": len(results)}
    for name, items in groups.items():
        labelled = sum(i["labelled_duplicate"] for i in items)
        closed_as_dup = sum(1 for i in items if not i["labelled_duplicate"]
                            and "Duplicate" in (i["query_resolution"], i["candidate_resolution"]))
        report[name] = {"reports": len(items), "labelled_duplicates": labelled,
                        "precision_by_labels_if_all_called_duplicate": round(labelled / len(items), 3) if items else None,
                        "unlabelled_but_one_side_closed_as_duplicate_in_jira": closed_as_dup, "items": items}
        print(f"best candidate has the {name}: {len(items)} reports, {labelled} labelled duplicates "
              f"(precision by the labels if all called 'duplicate': {report[name]['precision_by_labels_if_all_called_duplicate']}); "
              f"of the unlabelled ones, {closed_as_dup} have one side closed as Duplicate in Jira")
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
