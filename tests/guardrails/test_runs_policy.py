"""Runs (idempotent open, finish, list), policy validation / reload / audit, the client, metrics, OpenAPI."""
from __future__ import annotations

import threading
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
import requests
import yaml
from click.testing import CliRunner

from services.guardrails import cli, service
from services.guardrails.app import create_app
from services.guardrails.policy import PolicyError, load_policy
from shared.guardrails_client import BudgetDenied, GuardrailsClient, GuardrailsError
from tests.conftest import TEST_TOKENS, auth
from tests.guardrails.conftest import ROOT, write_config


def test_repo_config_is_valid():
    p = load_policy(ROOT / "config")
    assert p.tasks["triage"].run_cap_micros == 500_000
    assert p.prices["claude-sonnet-4-6"].cache_read == 300  # $0.30 / Mtok = 300 nano-USD per token
    assert p.resolve_model("claude-haiku-4-5-20251001") == "claude-haiku-4-5"


def test_retirement_dates_parse_from_yaml_and_check_warns_ahead(tmp_path):
    soon = (date.today() + timedelta(days=10)).isoformat()
    cfg = write_config(tmp_path / "c", {"models": {"retirements": {"claude-sonnet-4-6": soon}}})
    text = (cfg / "policy.yaml").read_text()
    assert f"claude-sonnet-4-6: '{soon}'" in text or f"claude-sonnet-4-6: {soon}" in text
    p = load_policy(cfg)
    assert p.retirements["claude-sonnet-4-6"] == date.fromisoformat(soon)
    out = CliRunner().invoke(cli.policy, ["check", "--config-dir", str(cfg)])
    assert out.exit_code == 0, out.output
    assert "warning: task 'digest': model 'claude-sonnet-4-6' retires upstream on " + soon in out.output
    # The repo's own policy names no task model that is already retired.
    repo = load_policy(ROOT / "config")
    assert not any("was retired" in w for w in repo.retirement_warnings(date.today()))


def test_retirement_of_an_unknown_model_or_a_bad_date_is_an_error(tmp_path):
    bad_date = write_config(tmp_path / "a", {"models": {"retirements": {"claude-haiku-4-5": "soon"}}})
    with pytest.raises(PolicyError) as exc:
        load_policy(bad_date)
    assert [p for p, _ in exc.value.errors if p.startswith("policy.models.retirements.claude-haiku-4-5")]
    unknown = write_config(tmp_path / "b", {"models": {"retirements": {"claude-nope-1": "2027-01-01"}}})
    with pytest.raises(PolicyError) as exc:
        load_policy(unknown)
    assert exc.value.errors == [("policy.models.retirements.claude-nope-1", "has no tier in models.tiers")]


def test_invalid_config_lists_every_error_by_path_and_stops_the_service(tmp_path, make_settings):
    cfg = write_config(tmp_path / "bad", {"limits": {"daily_usd": -1}, "heartbeats": {"x": {"interval_seconds": 0}},
                                          "tasks": {"triage": {"triggers": ["cron"]}}, "timezone": "Mars/Olympus"},
                       {"models": {"claude-haiku-4-5": {"input": "cheap", "cache_read": 0.0001}}})
    with pytest.raises(PolicyError) as exc:
        create_app(make_settings("guardrails", config_dir=str(cfg)), background=False)
    paths = [p for p, _ in exc.value.errors]
    assert paths == sorted(["policy.limits.daily_usd", "policy.heartbeats.x.interval_seconds",
                            "policy.tasks.triage.triggers.0", "policy.timezone",
                            "prices.models.claude-haiku-4-5.input", "prices.models.claude-haiku-4-5.cache_read"])
    # Cross-references are checked too once the shapes are right.
    cfg2 = write_config(tmp_path / "bad2", {"tasks": {"triage": {"models": ["claude-haiku-4-5", "gpt-9"]},
                                                      "digest": {"models": ["claude-opus-4-5"]}}})
    with pytest.raises(PolicyError) as exc:
        load_policy(cfg2)
    assert [p for p, _ in exc.value.errors] == ["policy.tasks.digest.models.0", "policy.tasks.triage.models.1"]
    res = CliRunner().invoke(cli.policy, ["check", "--config-dir", str(cfg2)])
    assert res.exit_code == 1 and "policy.tasks.triage.models.1" in res.output


def test_reload_reaches_other_workers_and_is_audited(make_guardrails, database_url, sql):
    a = make_guardrails()
    b = make_guardrails()  # a second "worker" with its own PolicyStore
    assert a.policy.tasks["triage"].run_cap_micros == 500_000
    doc = yaml.safe_load((a.config_dir / "policy.yaml").read_text())
    doc["tasks"]["triage"]["run_cap"]["usd"] = 0.25
    (a.config_dir / "policy.yaml").write_text(yaml.safe_dump(doc))
    r = requests.post(a.url + "/v1/policy/reload", headers=auth("ops"), timeout=5)
    assert r.status_code == 200 and r.json()["changed"] is True
    assert r.json()["changes"] == ["policy.tasks.triage.run_cap.usd"]
    deadline = time.monotonic() + 3
    while b.policy.tasks["triage"].run_cap_micros != 250_000:
        assert time.monotonic() < deadline, "the other worker did not pick up the new policy"
        time.sleep(0.05)
    run = b.client().open_run("triage", trigger="event")
    assert run.budget["limit_micros"] == 250_000
    # Reloading the same files is not a change; an invalid file changes nothing and says why.
    assert requests.post(a.url + "/v1/policy/reload", headers=auth("ops"), timeout=5).json()["changed"] is False
    doc["limits"]["monthly_usd"] = "lots"
    (a.config_dir / "policy.yaml").write_text(yaml.safe_dump(doc))
    bad = requests.post(a.url + "/v1/policy/reload", headers=auth("ops"), timeout=5)
    assert bad.status_code == 400 and bad.json()["errors"][0]["path"] == "policy.limits.monthly_usd"
    assert requests.post(a.url + "/v1/policy/reload", headers=auth("triage"), timeout=5).status_code == 403
    changes = sql.execute("SELECT actor, data FROM guardrails.audit_log WHERE kind = 'policy.changed' ORDER BY seq"
                          ).fetchall()
    assert [c["actor"].split(":")[0] for c in changes] == ["startup", "api"]
    # The CLI reload (files given by path) records a new version too.
    doc["limits"]["monthly_usd"] = 6
    (a.config_dir / "policy.yaml").write_text(yaml.safe_dump(doc))
    res = CliRunner().invoke(cli.policy, ["reload", "--config-dir", str(a.config_dir), "--actor", "dave",
                                          "--database-url", database_url])
    assert res.exit_code == 0 and "policy.limits.monthly_usd" in res.output
    with a.pool.connection() as conn:
        assert service.verify_audit(conn).ok


def test_open_run_is_idempotent_on_external_id_even_concurrently(guardrails, sql):
    c = guardrails.client("n8n")
    results: list[object] = []

    def open_() -> None:
        results.append(c.open_run("triage", trigger="event", workflow="triage-new-ticket", external_id="exec-42"))

    threads = [threading.Thread(target=open_) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert sql.execute("SELECT count(*) AS n FROM guardrails.runs").fetchone()["n"] == 1
    # The same external id under another task is another run.
    assert c.open_run("dedupe", trigger="event", external_id="exec-42").id != results[0].id


def test_finish_list_and_errors(guardrails):
    c = guardrails.client("n8n")
    r1 = c.open_run("triage", trigger="event", workflow="wf-a")
    r2 = c.open_run("digest", trigger="schedule", workflow="wf-b")
    done = c.finish_run(r1.id, "succeeded", {"tickets": 3})
    assert done.status == "succeeded"
    assert c.finish_run(r1.id, "succeeded").status == "succeeded"  # repeat: no-op
    with pytest.raises(GuardrailsError) as exc:
        c.finish_run(r1.id, "failed")
    assert (exc.value.status, exc.value.code) == (409, "run_already_finished")
    listed = requests.get(guardrails.url + "/v1/runs", params={"status": "open"}, headers=auth("ops"), timeout=5)
    assert [r["id"] for r in listed.json()] == [r2.id]
    listed = requests.get(guardrails.url + "/v1/runs", params={"task": "triage"}, headers=auth("ops"), timeout=5)
    assert [r["outcome"] for r in listed.json()] == [{"tickets": 3}]
    with pytest.raises(GuardrailsError) as exc:
        c.get_run("00000000-0000-0000-0000-000000000000")
    assert (exc.value.status, exc.value.code) == (404, "unknown_run")
    bad = requests.post(guardrails.url + "/v1/runs", json={"task": "triage", "trigger": "cron"}, headers=auth(),
                        timeout=5)
    assert bad.status_code == 400 and "trigger" in bad.json()["errors"]
    bad = requests.post(guardrails.url + "/v1/runs", json={"task": "nope", "trigger": "event"}, headers=auth(),
                        timeout=5)
    assert bad.status_code == 400 and bad.json()["errors"] == {"task": ["unknown task"]}
    with pytest.raises(BudgetDenied) as exc:
        c.open_run("investigate", trigger="schedule")
    assert exc.value.reason == "trigger_not_allowed"
    assert requests.post(guardrails.url + "/v1/runs", json={"task": "triage", "trigger": "event"},
                         timeout=5).status_code == 401
    with pytest.raises(GuardrailsError) as exc:
        GuardrailsClient(guardrails.url, "not-a-valid-token-at-all").open_run("triage", trigger="event")
    assert exc.value.status == 401


def test_run_open_is_refused_when_a_cap_is_exhausted(guardrails, sql):
    c = guardrails.client("triage")
    day = service.period_caps(guardrails.policy, "triage")[1]
    sql.execute("INSERT INTO guardrails.caps (key, scope, lock_rank, period, limit_micros, spent_micros) "
                "VALUES (%s, 'daily', 1, %s, %s, %s)", (day["key"], day["period"], day["limit"], day["limit"]))
    with pytest.raises(BudgetDenied) as exc:
        c.open_run("triage", trigger="event")
    assert exc.value.reason == "daily_cap_exhausted"
    budgets = requests.get(guardrails.url + "/v1/budgets", headers=auth("ops"), timeout=5).json()
    daily = [b for b in budgets["caps"] if b["scope"] == "daily"][0]
    assert daily["remaining_micros"] == 0
    # Every refusal is in the audit trail (its own transaction: the refused opening's is rolled back).
    with pytest.raises(BudgetDenied):
        c.open_run("investigate", trigger="schedule", external_id="n8n-exec-7")
    requests.post(guardrails.url + "/v1/kill-switch/engage", json={"actor": "alice", "reason": "drill"},
                  headers=auth("ops"), timeout=5).raise_for_status()
    with pytest.raises(BudgetDenied):
        c.open_run("digest", trigger="schedule", workflow="digest-weekly")
    rows = sql.execute("SELECT actor, task, subject, data FROM guardrails.audit_log WHERE kind = 'run.denied' "
                       "ORDER BY seq").fetchall()
    assert [(r["actor"], r["task"], r["subject"], r["data"]["reason"]) for r in rows] == [
        ("triage", "triage", day["key"], "daily_cap_exhausted"),
        ("triage", "investigate", "trigger_not_allowed", "trigger_not_allowed"),
        ("triage", "digest", "kill_switch_engaged", "kill_switch_engaged")]
    assert rows[1]["data"]["external_id"] == "n8n-exec-7" and rows[2]["data"]["workflow"] == "digest-weekly"
    assert "alice" in rows[2]["data"]["detail"]
    assert sql.execute("SELECT count(*) AS n FROM guardrails.runs").fetchone()["n"] == 0
    verify = requests.get(guardrails.url + "/v1/audit/verify", headers=auth("ops"), timeout=5)
    assert verify.status_code == 200 and verify.json()["ok"] is True, verify.text


def test_client_run_context_manager_finishes_runs(guardrails):
    c = guardrails.client("watch")
    with c.run("watch", trigger="schedule", external_id="snap-1") as run:
        assert run.status == "open"
    assert c.get_run(run.id).status == "succeeded"
    with pytest.raises(ZeroDivisionError):
        with c.run("watch", trigger="schedule") as run2:
            1 / 0
    assert c.get_run(run2.id).status == "failed"


def test_metrics_and_openapi(guardrails):
    text = requests.get(guardrails.url + "/metrics", timeout=5).text
    assert "metis_guardrails_ledger_up 1.0" in text
    assert 'metis_budget_limit_usd{cap="daily",scope="daily",task=""} 1.0' in text
    assert 'metis_budget_remaining_usd{cap="task:triage",scope="task_daily",task="triage"} 5.0' in text
    assert "metis_kill_switch_engaged 0.0" in text
    assert "metis_llm_open_reservations 0.0" in text
    spec = requests.get(guardrails.url + "/openapi.json", timeout=5).json()
    for path in ("/v1/runs", "/v1/runs/{run_id}/finish", "/v1/kill-switch/engage", "/v1/audit/verify",
                 "/v1/heartbeats/{name}", "/v1/budgets", "/v1/policy/reload"):
        assert path in spec["paths"], path


def test_client_from_settings_uses_own_token(make_settings, guardrails):
    s = make_settings("triage", guardrails_url=guardrails.url)
    c = GuardrailsClient.from_settings(s)
    assert c.open_run("triage", trigger="manual").status == "open"
    assert TEST_TOKENS["triage"].get() not in repr(c.__dict__)
    assert Path(ROOT / "config" / "prices.yaml").exists()
