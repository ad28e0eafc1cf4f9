"""The digest's pure logic: tickets, monitoring rules, attention score, patterns, health, config."""
from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pytest
import yaml
from marshmallow import ValidationError

from services.digest.config import ConfigError, load_config, parse_config
from services.digest.health import Account, Case, DocState, accounts_from_records, health_scores
from services.digest.patterns import find_patterns, star_clusters, trend_of
from services.digest.rules import attention_scores, evaluate_monitor
from services.digest.sources import jql_and

from .factories import CONFIG, NOW, issue, ticket


def test_ticket_normalisation_reads_clients_links_flags_and_reopens():
    t = ticket("PAY-1", client="acme", labels=["client-globex", "escalated"], flagged=True, reopens=2,
               blocked_by=[("PAY-2", "In Progress"), ("PAY-3", "Done")], duplicated_by=["SUP-9"],
               description="Totals are wrong", priority="High")
    assert t.clients == ("acme", "globex")
    assert t.flagged and t.escalated and t.reopen_count == 2
    assert t.open_blockers == ("PAY-2",)
    assert t.duplicated_by == ("SUP-9",)
    assert t.description.strip() == "Totals are wrong"
    assert t.priority == "High" and t.is_open
    # No status-category change date in the payload: the last update stands in for it.
    assert t.status_since == t.updated


def test_monitor_rules_per_priority_with_reasons():
    rules = CONFIG.monitor
    tickets = [
        ticket("PAY-1", priority="High", updated=4),               # stale: limit 3 days for High
        ticket("PAY-2", priority="Low", updated=4),                # fine: limit 14 days for Low
        ticket("PAY-3", priority="Blocker", updated=0.1),          # blocker priority
        ticket("PAY-4", priority="Medium", updated=1, blocked_by=[("PAY-9", "In Progress")]),
        ticket("PAY-5", priority="Medium", updated=1, blocked_by=[("PAY-8", "Done")]),  # blocker resolved
        ticket("PAY-6", priority="Medium", updated=1, flagged=True),
        ticket("PAY-7", priority="Medium", status="Waiting for Customer", updated=6),
        ticket("PAY-10", priority="High", updated=30, status="Done"),  # closed: never a finding
    ]
    findings = {f.ticket.key: f for f in evaluate_monitor(tickets, rules, NOW)}
    assert set(findings) == {"PAY-1", "PAY-3", "PAY-4", "PAY-6", "PAY-7"}
    assert [r.rule for r in findings["PAY-1"].reasons] == ["stale"]
    assert "limit for High: 3 days" in findings["PAY-1"].reasons[0].detail
    assert "4.0 days" in findings["PAY-1"].reasons[0].detail
    assert [r.rule for r in findings["PAY-3"].reasons] == ["blocker"]
    assert findings["PAY-4"].reasons[0].detail == "is blocked by unresolved PAY-9"
    assert [r.rule for r in findings["PAY-6"].reasons] == ["flagged"]
    assert {r.rule for r in findings["PAY-7"].reasons} == {"waiting"}
    # Blocker priority is the most urgent, first.
    assert evaluate_monitor(tickets, rules, NOW)[0].ticket.key == "PAY-3"


def test_waiting_time_counts_from_the_status_change_when_jira_reports_it():
    # Updated yesterday (a comment), but waiting on the customer for 9 days: still waiting too long.
    t = ticket("SUP-1", status="Waiting for Customer", updated=1, status_since=9)
    (f,) = evaluate_monitor([t], CONFIG.monitor, NOW)
    assert [r.rule for r in f.reasons] == ["waiting"] and "for 9.0 days" in f.reasons[0].detail
    assert not evaluate_monitor([ticket("SUP-2", status="Waiting for Customer", updated=9, status_since=2)],
                                CONFIG.with_overrides("monitor", {"stale_days": {"Medium": 30}}), NOW)


def test_monitor_overrides_change_the_rules():
    rules = CONFIG.with_overrides("monitor", {"stale_days": {"Low": 2}, "waiting_days": 10})
    tickets = [ticket("PAY-2", priority="Low", updated=4),
               ticket("PAY-7", priority="Lowest", status="Waiting for Customer", updated=6)]
    keys = [f.ticket.key for f in evaluate_monitor(tickets, rules, NOW)]
    assert keys == ["PAY-2"]
    with pytest.raises(ValidationError) as err:
        CONFIG.with_overrides("monitor", {"stale_days": {"High": -1}, "bogus": 1})
    assert set(err.value.messages["rules"]) == {"stale_days", "bogus"}


def test_attention_score_parts_add_up_and_rank():
    tickets = [
        ticket("PAY-1", priority="Blocker", created=60, updated=20, client="acme", reopens=3,
               duplicated_by=["SUP-2", "SUP-3"]),
        ticket("SUP-2", priority="Low", created=5, updated=5, client="globex"),
        ticket("SUP-3", priority="Low", created=5, updated=5, client="initech"),
        ticket("PAY-4", priority="Medium", created=2, updated=1, client="initech"),
    ]
    value = {"acme": 1_000_000.0, "globex": 250_000.0, "initech": 50_000.0}
    scored = attention_scores(tickets, CONFIG.weekly, NOW, customer_value=value)
    top = scored[0]
    assert top.ticket.key == "PAY-1"
    parts = {p.name: p for p in top.parts}
    assert set(parts) == {"priority", "age", "staleness", "clients", "duplicates", "reopenings", "customer_value"}
    assert top.score == pytest.approx(sum(p.points for p in top.parts), abs=0.05)
    assert parts["priority"].points == 25.0
    assert parts["reopenings"].normalized == 1.0 and parts["reopenings"].points == 10.0
    assert parts["duplicates"].value == 2 and parts["duplicates"].points == pytest.approx(4.0)
    # Clients include the duplicates' clients; value is theirs summed, relative to the largest account.
    assert top.clients == ("acme", "globex", "initech")
    assert parts["customer_value"].normalized == 1.0
    assert parts["age"].value == pytest.approx(60, abs=0.01) and parts["age"].normalized == pytest.approx(60 / 90, abs=1e-3)
    assert all(0 <= s.score <= 100 for s in scored)
    assert [s.score for s in scored] == sorted((s.score for s in scored), reverse=True)


def test_attention_score_weights_must_add_to_100():
    bad = dict(CONFIG.raw["weekly"]["weights"], priority=50)
    with pytest.raises(ValidationError) as err:
        CONFIG.with_overrides("weekly", {"weights": bad})
    assert "weights" in err.value.messages["rules"]


def _vec(*hot: int, dim: int = 16, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    for h in hot:
        v[h] = 1.0
    if noise:
        v += np.random.default_rng(seed).normal(0, noise, dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_star_clusters_group_similar_vectors_without_chaining():
    # a—b and b—c are similar, a and c are not: c must not join a's cluster through b.
    a = _vec(0)
    a2 = np.array([1, -0.3] + [0] * 14, dtype=np.float32)
    b = np.array([1, 0.8] + [0] * 14, dtype=np.float32)
    c = _vec(1)
    far = _vec(5)
    x = np.vstack([a, a, a, a2 / np.linalg.norm(a2), b / np.linalg.norm(b), c, far])
    clusters = star_clusters(x, threshold=0.6, min_size=2)
    assert len(clusters) == 1
    assert clusters[0].center == 0
    assert set(clusters[0].members) == {0, 1, 2, 3, 4}  # never c (5), though c is close to b
    assert all(s >= 0.6 for s in clusters[0].similarity)
    assert list(clusters[0].similarity) == sorted(clusters[0].similarity, reverse=True)


def test_patterns_span_clients_and_trend_against_previous_window():
    rules = CONFIG.with_overrides("patterns", {"similarity": 0.8, "min_clients": 2, "min_tickets": 3})
    cur = [ticket(f"SUP-{i}", client=c, created=1 + i * 0.1, summary=f"Overtime wrong {i}", components=["Payroll"])
           for i, c in enumerate(["acme", "globex", "initech", "acme"])]
    single = [ticket(f"SUP-{10 + i}", client="acme", created=2, summary="Login slow") for i in range(3)]
    cur_vecs = np.vstack([_vec(0, noise=0.05, seed=i) for i in range(4)] + [_vec(3, noise=0.05, seed=9 + i)
                                                                           for i in range(3)])
    prev = [ticket("SUP-90", client="acme", created=9, summary="Overtime wrong before")]
    prev_vecs = np.vstack([_vec(0, noise=0.05, seed=99)])
    patterns = find_patterns(cur + single, cur_vecs, prev, prev_vecs, rules)
    assert len(patterns) == 1  # the single-client cluster is not a cross-client pattern
    p = patterns[0]
    assert p.count == 4 and dict(p.clients) == {"acme": 2, "globex": 1, "initech": 1}
    assert p.representative.key in {t.key for t in cur}
    assert p.previous_count == 1 and p.previous_clients == ("acme",)
    assert p.trend == "rising" and p.components == ("Payroll",)
    assert trend_of(3, 0) == "new" and trend_of(3, 3) == "stable" and trend_of(2, 4) == "falling"


def test_health_components_and_missing_sources():
    rules = CONFIG.health
    tickets = [ticket("PAY-1", client="acme", priority="Blocker", created=30),
               ticket("PAY-2", client="acme", priority="High", created=10, labels=["escalated"]),
               ticket("PAY-3", client="acme", status="Done", resolved=5, reopens=1),
               ticket("PAY-4", client="globex", priority="Low", created=3)]
    accounts = [Account("001A", "acme", "Acme Corp", 1e6, NOW.date() + timedelta(days=45), "4001",
                        NOW - timedelta(days=10))]
    cases = [Case("001A", True, False), Case("001A", False, False), Case("001A", True, True)]
    docs = {"4001": DocState("4001", "Acme payroll configuration", NOW - timedelta(days=40), 7)}
    scores = {h.client: h for h in health_scores(tickets, rules, NOW, accounts=accounts, cases=cases, docs=docs,
                                                  salesforce_configured=True, confluence_configured=True)}
    acme = {c.name: c for c in scores["acme"].components}
    assert acme["open_defects"].value["severity_points"] == 13  # Blocker 10 + High 3
    assert acme["open_defects"].score == pytest.approx(100 * (1 - 13 / 40), abs=0.1)
    assert acme["reopen_rate"].value == pytest.approx(1 / 3, abs=1e-3)
    assert acme["escalations"].value == 1
    assert acme["open_cases"].value == 2 and acme["escalated_cases"].value == 1
    assert acme["renewal"].score == pytest.approx(100 * 45 / 180, abs=0.1)
    assert acme["documentation"].score == 0.0 and "out of date" in acme["documentation"].explanation
    weighted = sum(c.weight * c.score for c in acme.values()) / sum(c.weight for c in acme.values())
    assert scores["acme"].score == pytest.approx(weighted, abs=0.1)
    # globex has no Salesforce account: those components are shown as unavailable, not counted.
    globex = {c.name: c for c in scores["globex"].components}
    assert not globex["open_cases"].available and "no Salesforce account" in globex["open_cases"].explanation
    avail = [c for c in globex.values() if c.available]
    assert scores["globex"].score == pytest.approx(sum(c.weight * c.score for c in avail) /
                                                   sum(c.weight for c in avail), abs=0.1)
    assert 0 <= scores["acme"].score < scores["globex"].score <= 100


def test_accounts_from_salesforce_records():
    recs = [{"Id": "001A", "Name": "Acme Corp", "AnnualRevenue": 1200000, "Metis_Client_Key__c": "acme",
             "Renewal_Date__c": "2025-09-30", "Config_Doc_Page_Id__c": "4001",
             "Config_Last_Changed__c": "2025-05-20T10:00:00.000+0000"},
            {"Id": "001B", "Name": "Not a client", "Metis_Client_Key__c": None}]
    (a,) = accounts_from_records(recs, CONFIG.salesforce)
    assert (a.client, a.name, a.value, a.renewal_date, a.config_page_id) == \
        ("acme", "Acme Corp", 1200000.0, date(2025, 9, 30), "4001")
    assert a.config_changed is not None and a.config_changed.day == 20


def test_jql_composition_keeps_order_by_last():
    assert jql_and("project = PAY ORDER BY updated ASC", 'created >= "2025-01-01 00:00"') == \
        '(project = PAY) AND (created >= "2025-01-01 00:00") ORDER BY updated ASC'
    assert jql_and("a = 1 order by b", "c = 2", order_by="created ASC") == "(a = 1) AND (c = 2) ORDER BY created ASC"


def test_config_errors_are_listed_by_path(tmp_path):
    raw = yaml.safe_load(open("config/digest.yaml"))
    raw["monitor"]["stale_days"] = {"High": 0}
    raw["weekly"]["weights"]["priority"] = 99
    raw["patterns"]["similarity"] = 5
    del raw["health"]
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    for path in ("monitor.stale_days", "weekly.weights", "patterns.similarity", "health: missing section"):
        assert path in text
    (tmp_path / "digest.yaml").write_text("version: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path)
    assert issue("PAY-1")["key"] == "PAY-1"
