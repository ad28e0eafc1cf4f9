"""deploy/: Prometheus rules pass `promtool test rules`; rules and the Grafana dashboard use metrics guardrails exports."""
from __future__ import annotations

import json
import re
import subprocess

import requests
import yaml

from tests.guardrails.conftest import ROOT, ensure_tool

PROM = ROOT / "deploy" / "prometheus"


def _promtool() -> str:
    return ensure_tool("promtool")


def test_promtool_checks_and_rule_unit_tests_pass():
    tool = _promtool()
    for argv in (["check", "rules", str(PROM / "rules" / "guardrails.yml")],
                 ["check", "config", str(PROM / "prometheus.local.yml")],
                 ["test", "rules", str(PROM / "tests" / "guardrails_test.yml")]):
        r = subprocess.run([tool, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"promtool {' '.join(argv)}:\n{r.stdout}\n{r.stderr}"


_METRIC = re.compile(r"\b(metis_[a-z_]+)")


def _exported(guardrails) -> set[str]:
    text = requests.get(guardrails.url + "/metrics", timeout=5).text
    names = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return names | {n + "_total" for n in names}


def test_rules_and_dashboard_only_use_exported_metrics(guardrails):
    exported = _exported(guardrails)
    rules = yaml.safe_load((PROM / "rules" / "guardrails.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((ROOT / "deploy" / "grafana" / "metis-guardrails-cost.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in _METRIC.findall(e)}
    assert used and used <= exported, sorted(used - exported)
