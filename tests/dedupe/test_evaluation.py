"""A small evaluation through the real HTTP API: gunicorn, the real model, real PostgreSQL."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from services.dedupe.cli import run_evaluation
from services.dedupe.config import load_config
from services.dedupe.evaluation import DEFAULT_FEATURES, load_dataset
from services.dedupe.verdict import FEATURES
from shared.embeddings import minilm_name

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.xdist_group("dedupe")

TOPICS = [
    ("NameNode crashes with OutOfMemoryError during block report", "Heap exhausted while processing a full block report."),
    ("S3A connector leaks HTTP connections on aborted reads", "Connections are not returned to the pool after abort()."),
    ("Kerberos ticket renewal fails after 24 hours", "The UGI relogin thread stops renewing the TGT."),
    ("Upgrade Jackson databind to fix CVE-2020-36518", "jackson-databind 2.10 is vulnerable; bump it."),
    ("Distcp loses file permissions when -p is given", "Permissions are reset to default on the target cluster."),
    ("YARN web UI shows wrong queue capacity", "Capacity scheduler page reports 200% for the default queue."),
    ("ABFS token provider ignores proxy settings", "The OAuth token fetch bypasses the configured HTTP proxy."),
    ("Balancer never finishes on heterogeneous storage", "Iterations repeat forever moving the same blocks."),
    ("Typo in the HDFS federation documentation", "The word 'namespace' is misspelled in federation.md."),
    ("Docker image build fails on aarch64", "The base image has no arm64 variant for protobuf."),
    ("Checksum mismatch reading erasure-coded files", "Reconstructed stripes have wrong CRC after a DataNode restart."),
    ("ZStandard codec fails on empty input", "Compressing a zero-length buffer throws an internal error."),
]
DUPLICATES = [
    (0, "NameNode OOM when a huge block report arrives", "Out of memory in the NameNode processing block reports."),
    (1, "S3A leaks pooled HTTP connections after abort", "Aborted S3A input streams keep their connection forever."),
    (3, "Bump jackson-databind for CVE-2020-36518", "Security: jackson databind needs an upgrade."),
    (6, "ABFS OAuth token fetch does not use the proxy", "Token provider ignores fs.azure proxy settings."),
    (11, "ZStandardCodec error compressing an empty buffer", "zero length input to the zstd codec fails."),
]


def write_dataset(tmp: Path) -> tuple[Path, Path]:
    issues, pairs = tmp / "issues.csv", tmp / "pairs.csv"
    with open(issues, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Summary", "Issue id", "Status", "Priority", "Resolution", "Created", "Resolved",
                    "Affects Version/s", "Description"])
        for i, (s, d) in enumerate(TOPICS):
            w.writerow([s, 100 + i, "Resolved", "Major", "Fixed", f"{i + 1:02d}/Jan/21 10:00", "", "3.3.0", d])
        for j, (orig, s, d) in enumerate(DUPLICATES):
            w.writerow([s, 200 + j, "Resolved", "Major", "Duplicate", f"{j + 1:02d}/Mar/21 10:00", "", "", d])
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Issue id", "Duplicate id"])
        for j, (orig, _, _) in enumerate(DUPLICATES):
            w.writerow([200 + j, 100 + orig])
            w.writerow([100 + orig, 200 + j])
    return issues, pairs


def test_dataset_follows_the_time_ordered_protocol(tmp_path: Path) -> None:
    data = load_dataset(*write_dataset(tmp_path), prefix="T")
    assert len(data.queries) == 5
    for key, earlier in data.queries:
        assert all(data.by_key[e]["_t"] < data.by_key[key]["_t"] for e in earlier)
    assert not {k for k, _ in data.queries} & set(data.negatives)


def test_evaluation_through_gunicorn(tmp_path: Path, database_url: str) -> None:
    issues, pairs = write_dataset(tmp_path)
    rep = run_evaluation(issues_csv=issues, pairs_csv=pairs, url=None, token=None, database_url=database_url,
                         workers=1, calibrate_=True)
    ranking = rep["ranking"]["all"]
    assert ranking["queries"] == 5
    assert ranking["RR@10"] == 1.0 and ranking["RR@1"] >= 0.8 and ranking["MAP"] >= 0.8
    assert rep["indexing"]["tickets"] == len(TOPICS) + len(DUPLICATES)
    assert rep["indexing"]["embedded"] == rep["indexing"]["tickets"]
    v = rep["verdict"]["all"]
    assert 0.0 <= v["dup_false_rate_on_no_duplicate"] <= 1.0 and v["no_duplicate_reports"] > 0
    assert rep["latency"]["n"] == 5 + v["no_duplicate_reports"]
    assert 0 <= rep["calibrated_on_dev"]["possible"] <= rep["calibrated_on_dev"]["duplicate"] <= 1
    # The verdict model's inputs came back through the HTTP API for every query, and the model was fitted on them.
    assert all(set(r["features"]) == set(FEATURES) for r in rep["results"])
    assert set(rep["calibrated_on_dev"]["weights"]) == set(DEFAULT_FEATURES)
    # The fitted weights name the vectors they were fitted on, as the service reports them (verdict.embedder).
    assert rep["calibrated_on_dev"]["embedder"] == minilm_name(load_config(ROOT / "config").embedding)
    for split in ("dev", "test"):
        m = rep["verdict_with_calibrated"][split]
        assert m["dup_correct"] <= m["dup_said"] <= m["possible_or_dup_said"]
        assert len(m["top20"]) == min(20, sum(1 for r in rep["results"] if r["split"] == split))
