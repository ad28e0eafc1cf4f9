"""Prometheus series of the digest: client health for the dashboards, job outcomes for alerting."""
from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import Counter, Gauge, Histogram

# "mostrecent": under several gunicorn workers the value last set by any worker wins, and it
# survives the worker that set it (health scores are facts until the next run replaces them).
CLIENT_HEALTH = Gauge("metis_digest_client_health_score", "Client health score 0-100 (latest run)",
                      ["client"], multiprocess_mode="mostrecent")
CLIENT_HEALTH_COMPONENT = Gauge("metis_digest_client_health_component_score",
                                "Client health component score 0-100 (latest run; absent when no data)",
                                ["client", "component"], multiprocess_mode="mostrecent")
FINDINGS = Gauge("metis_digest_monitor_findings", "Open defects matching each monitoring rule (latest run)",
                 ["rule"], multiprocess_mode="mostrecent")
PATTERNS = Gauge("metis_digest_patterns", "Cross-client patterns found by trend (latest run)", ["trend"],
                 multiprocess_mode="mostrecent")
LAST_SUCCESS = Gauge("metis_digest_last_success_timestamp_seconds", "When each job last produced a digest",
                     ["job"], multiprocess_mode="mostrecent")
JOB_SECONDS = Histogram("metis_digest_job_duration_seconds", "Job duration end to end inside the service",
                        ["job"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300))
JOB_FAILURES = Counter("metis_digest_job_failures_total", "Jobs that failed (nothing archived or sent)",
                       ["job", "code"])
NARRATIVES = Counter("metis_digest_narratives_total", "Narratives written, by who wrote them", ["job", "mode"])

RULES = ("stale", "blocker", "blocked", "flagged", "waiting")
TRENDS = ("new", "rising", "stable", "falling")


def export_health(rows: Iterable[dict[str, Any]]) -> None:
    """Set the health gauges from stored or fresh scores ({client, score, components: [...]})."""
    for r in rows:
        CLIENT_HEALTH.labels(r["client"]).set(float(r["score"]))
        for c in r.get("components") or []:
            if c.get("available") and c.get("score") is not None:
                CLIENT_HEALTH_COMPONENT.labels(r["client"], c["name"]).set(float(c["score"]))


def export_findings(counts: dict[str, int]) -> None:
    for rule in RULES:
        FINDINGS.labels(rule).set(counts.get(rule, 0))


def export_patterns(counts: dict[str, int]) -> None:
    for trend in TRENDS:
        PATTERNS.labels(trend).set(counts.get(trend, 0))
