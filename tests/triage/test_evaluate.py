"""The evaluation command: metrics are right, and the protocol runs through dedupe's real HTTP API."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from services.triage.cli import triage as triage_cli
from services.triage.evaluate import DedupeHttp, calibration, classification_metrics, evaluate, parse_date, selective
from tests.conftest import TEST_TOKENS


def test_metrics_by_hand() -> None:
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", None], ["a", "b"])
    assert m["accuracy"] == 0.5
    # a: P 1/1 R 1/2 -> F1 2/3; b: P 1/2 R 1/2 -> F1 1/2; macro = 7/12
    assert m["macro_f1"] == round(7 / 12, 4)
    assert m["confusion"]["b"] == {"a": 0, "b": 1, "(none)": 1}
    cal = calibration([0.95, 0.95, 0.15, 0.15], [True, True, False, False])
    assert cal["ece"] == pytest.approx(0.1, abs=1e-9)
    assert selective([0.9, 0.2, 0.6], [True, False, False], 0.5) == {"threshold": 0.5, "coverage": 0.6667,
                                                                   "accuracy": 0.5}


def test_jira_csv_dates() -> None:
    assert parse_date("30/Sep/21 17:20").isoformat() == "2021-09-30T17:20:00+00:00"  # type: ignore[union-attr]
    assert parse_date("garbage") is None


def _write_csv(path: Path) -> None:
    topics = {"Minor": ["typo", "wording", "label", "spelling", "tooltip"],
              "Major": ["timeout", "crash", "exception", "failure", "leak"],
              "Blocker": ["corruption", "dataloss", "outage", "deadlock", "unrecoverable"]}
    rnd = random.Random(3)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Id", "Summary", "Description", "Priority", "Created", "Status", "Resolution"])
        for i in range(90):
            label = ["Minor", "Major", "Blocker"][i % 3]
            words = rnd.sample(topics[label], 3)
            w.writerow([f"{1000 + i}", f"{words[0]} in {words[1]} module", f"We see {words[2]} when {words[0]}.",
                        label, f"{(i % 28) + 1:02d}/Jan/{20 + i // 28} 10:{i % 60:02d}", "Resolved", "Fixed"])


def test_evaluate_through_dedupe_http(services, tmp_path: Path) -> None:
    path = tmp_path / "tickets.csv"
    _write_csv(path)
    dedupe = DedupeHttp(services.url("dedupe"), TEST_TOKENS["triage"].get())
    from services.triage.config import load_taxonomy, load_triage_config
    root = Path(__file__).resolve().parents[2] / "config"
    taxonomy = load_taxonomy(root / "taxonomy.yaml")
    cfg = load_triage_config(root / "triage.yaml", taxonomy)
    result = evaluate(csv_path=path, text_columns=["Summary", "Description"], label_column="Priority",
                      dedupe=dedupe, taxonomy=taxonomy, cfg=cfg, key_column="Id", created_column="Created",
                      status_column="Status", resolution_column="Resolution", tune=False)
    assert result["rows"] == 90 and result["field"] == "priority"
    assert result["split"] == {**result["split"], "dev": 18, "test": 18}
    test = result["test"]
    assert test["n"] == 18
    # Three separable vocabularies: the neighbour vote gets nearly all right, far above the 1/3 baseline.
    assert test["accuracy"] >= 0.85 and test["macro_f1"] >= 0.8
    assert set(test["confusion"]) == {"Blocker", "Major", "Minor"}
    # The evaluation tickets are removed from dedupe again.
    probe = dedupe.similar({"summary": "typo in wording", "description": ""}, 5, {})
    assert not any(c["key"].startswith("EVAL") for c in probe)


def test_cli_reports_a_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("Summary,Priority\nx,Major\n")
    res = CliRunner().invoke(triage_cli, ["evaluate", "--csv", str(path), "--text-columns", "Summary,Body",
                                          "--label-column", "Priority", "--dedupe-url", "http://127.0.0.1:9"],
                             env={"METIS_TOKEN_TRIAGE": "x" * 20})
    assert res.exit_code == 1 and "no column(s) ['Body']" in res.output
