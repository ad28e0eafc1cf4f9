"""Kill switch: API, CLI, refused within a second across two gunicorn worker processes, survives restart."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from click.testing import CliRunner

from devstack.processes import free_port, start_service
from services.guardrails import cli
from shared.guardrails_client import BudgetDenied, GuardrailsClient
from tests.conftest import TEST_TOKENS, auth
from tests.guardrails.conftest import write_config

MSG = [{"role": "user", "content": "hi"}]


def test_engage_and_release_by_api_are_audited_and_refuse_everything(guardrails, sql):
    c = guardrails.client("triage")
    run = c.open_run("triage", trigger="event")
    r = requests.post(guardrails.url + "/v1/kill-switch/engage", json={"actor": "alice", "reason": "runaway loop"},
                      headers=auth("ops"), timeout=5)
    assert r.status_code == 200 and r.json()["engaged"] is True
    with pytest.raises(BudgetDenied) as exc:
        c.open_run("triage", trigger="event")
    assert exc.value.reason == "kill_switch_engaged" and "alice" in str(exc.value)
    with pytest.raises(BudgetDenied):
        c.anthropic(run.id).messages.create(model="claude-haiku-4-5", max_tokens=8, messages=MSG)
    with pytest.raises(BudgetDenied):
        c.heartbeat("digest-stale-scan")
    # Services may not pull the switch; only ops and n8n.
    assert requests.post(guardrails.url + "/v1/kill-switch/release", json={"actor": "x", "reason": "y"},
                         headers=auth("triage"), timeout=5).status_code == 403
    assert requests.post(guardrails.url + "/v1/kill-switch/engage", json={"reason": "no actor"},
                         headers=auth("ops"), timeout=5).json()["errors"] == {"actor": ["Missing data for required field."]}
    r = requests.post(guardrails.url + "/v1/kill-switch/release", json={"actor": "bob", "reason": "fixed"},
                      headers=auth("n8n"), timeout=5)
    assert r.json()["engaged"] is False
    assert c.open_run("triage", trigger="event").status == "open"
    entries = sql.execute("SELECT kind, actor, subject FROM guardrails.audit_log WHERE kind LIKE 'kill_switch%%' "
                          "ORDER BY seq").fetchall()
    assert entries == [{"kind": "kill_switch.engaged", "actor": "alice", "subject": "runaway loop"},
                       {"kind": "kill_switch.released", "actor": "bob", "subject": "fixed"}]
    alerts = sql.execute("SELECT kind FROM guardrails.alert_outbox ORDER BY id").fetchall()
    assert [a["kind"] for a in alerts] == ["kill_switch.engaged", "kill_switch.released"]


def test_cli_engages_and_releases(guardrails, database_url, sql):
    runner = CliRunner()
    res = runner.invoke(cli.kill_switch, ["engage", "--reason", "maintenance", "--actor", "carol",
                                          "--database-url", database_url])
    assert res.exit_code == 0, res.output
    assert runner.invoke(cli.kill_switch, ["status", "--database-url", database_url]).exit_code == 3
    with pytest.raises(BudgetDenied):
        guardrails.client().open_run("triage", trigger="event")
    res = runner.invoke(cli.kill_switch, ["release", "--reason", "done", "--actor", "carol",
                                          "--database-url", database_url])
    assert res.exit_code == 0 and runner.invoke(cli.kill_switch, ["status", "--database-url",
                                                                  database_url]).exit_code == 0
    assert guardrails.client().open_run("triage", trigger="event").status == "open"
    assert sql.execute("SELECT data->>'via' AS via FROM guardrails.audit_log WHERE kind = 'kill_switch.engaged'"
                       ).fetchone()["via"] == "cli"


def test_refused_within_a_second_across_two_workers_and_after_restart(database_url, emu, tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url, "METIS_CONFIG_DIR": str(write_config(tmp_path / "cfg")),
           "METIS_ANTHROPIC_URL": emu.anthropic_url, "ANTHROPIC_API_KEY": emu.anthropic_key,
           "METIS_GUARDRAILS_BACKGROUND": "0",
           **{f"METIS_TOKEN_{k.upper()}": v.get() for k, v in TEST_TOKENS.items()}}
    port = free_port()
    proc = start_service("guardrails", env=env, port=port, log_dir=tmp_path, workers=2)
    try:
        c = GuardrailsClient(proc.url, TEST_TOKENS["triage"])
        run = c.open_run("triage", trigger="event")
        llm = c.anthropic(run.id, max_retries=0)

        def call(_: int) -> str:
            try:
                llm.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=MSG)
                return "ok"
            except BudgetDenied as exc:
                return exc.reason

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(call, range(16))) == {"ok"}
            engaged_at = time.monotonic()
            r = requests.post(proc.url + "/v1/kill-switch/engage", json={"actor": "ops", "reason": "drill"},
                              headers=auth("ops"), timeout=5)
            assert r.status_code == 200
            # Every request from now on, whichever worker serves it, is refused; none reaches Anthropic.
            before = len(emu.anthropic_requests("/v1/messages"))
            results = list(pool.map(call, range(40)))
            assert set(results) == {"kill_switch_engaged"}
            assert time.monotonic() - engaged_at < 5  # the refusals above began with the first request
            assert len(emu.anthropic_requests("/v1/messages")) == before
        # Both worker processes refuse: new connections until each worker has answered at least once.
        pids: set[str] = set()
        headers = {"x-api-key": TEST_TOKENS["triage"].get(), "X-Metis-Run-Id": run.id, "Connection": "close",
                   "anthropic-version": "2023-06-01"}
        body = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": MSG}

        def raw_call(_: int) -> tuple[int, str, str]:
            r = requests.post(proc.url + "/anthropic/v1/messages", json=body, headers=headers, timeout=5)
            return r.status_code, r.headers.get("X-Metis-Denial", ""), r.headers["X-Metis-Worker"]

        with ThreadPoolExecutor(8) as pool:
            for _ in range(25):
                for status, denial, pid in pool.map(raw_call, range(8)):
                    assert (status, denial) == (403, "kill_switch_engaged")
                    pids.add(pid)
                if len(pids) == 2:
                    break
        assert len(pids) == 2, pids
        assert len(emu.anthropic_requests("/v1/messages")) == before
    finally:
        proc.stop()
    proc = start_service("guardrails", env=env, port=port, log_dir=tmp_path, workers=2)
    try:
        c = GuardrailsClient(proc.url, TEST_TOKENS["triage"])
        with pytest.raises(BudgetDenied) as exc:
            c.open_run("triage", trigger="event")
        assert exc.value.reason == "kill_switch_engaged"
    finally:
        proc.stop()
