"""The pieces of `make up` / `make down` that can be checked without taking the fixed ports."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from devstack import local, n8n, postgres, stack, tokens
from devstack.processes import ROOT, free_port, spawn
from shared.settings import Secret


def test_tokens_are_generated_once_0600_and_completed_when_missing(tmp_path: Path):
    path = tmp_path / "tokens.env"
    first = tokens.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for caller in stack.CALLERS:
        assert len(first[f"METIS_TOKEN_{caller.upper()}"]) >= 32
    assert len({first[f"METIS_TOKEN_{c.upper()}"] for c in stack.CALLERS}) == len(stack.CALLERS)
    assert tokens.load_or_create(path) == first
    # A value removed by hand comes back new; every other value is kept.
    kept = {k: v for k, v in first.items() if k != "METIS_TOKEN_OPS"}
    path.write_text("".join(f"{k}={v}\n" for k, v in kept.items()))
    os.chmod(path, 0o644)
    again = tokens.load_or_create(path)
    assert {k: again[k] for k in kept} == kept
    assert again["METIS_TOKEN_OPS"] and again["METIS_TOKEN_OPS"] != first["METIS_TOKEN_OPS"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _externals() -> stack.Externals:
    creds = {"anthropic_key": "emu-key-0123456789", "jira_user": "bot@example.com", "jira_token": "jira-tok-0123456789",
             "jira_webhook_secret": "hook-secret-0123456789", "salesforce_client_id": "sf-id",
             "salesforce_client_secret": "sf-secret-0123456789"}
    urls = {"anthropic": "http://127.0.0.1:1", "jira": "http://127.0.0.1:2", "slack": "http://127.0.0.1:3",
            "smtp": {"host": "127.0.0.1", "port": 4}}
    return stack.externals_from_emulators(urls, creds, slack_webhook_url="http://127.0.0.1:3/services/T/B/x")


def test_only_guardrails_gets_the_anthropic_key_and_nothing_secret_is_inherited():
    externals = _externals()
    tokens_ = {c: Secret(f"tok-{c}-0123456789abcdef") for c in stack.CALLERS}
    urls = stack.service_urls({"guardrails": 1, "triage": 2, "dedupe": 3, "digest": 4, "watch": 5})
    base = {"PATH": "/usr/bin", "ANTHROPIC_API_KEY": "sk-ant-from-the-shell", "METIS_TOKEN_OPS": "leaked-token",
            "DATABASE_URL": "postgresql://elsewhere/db", "METIS_LOG_LEVEL": "DEBUG"}
    envs = {s: stack.service_env(s, base=base, database_url="postgresql://x/metis", tokens=tokens_, urls=urls,
                                 externals=externals, config_dir="/cfg") for s in stack.SERVICES}
    assert envs["guardrails"]["ANTHROPIC_API_KEY"] == "emu-key-0123456789"
    assert all("ANTHROPIC_API_KEY" not in envs[s] for s in stack.SERVICES if s != "guardrails")
    assert "METIS_JIRA_API_TOKEN" not in envs["dedupe"] and "METIS_JIRA_WEBHOOK_SECRET" in envs["triage"]
    assert envs["dedupe"]["METIS_JIRA_WEBHOOK_SECRET"] == "hook-secret-0123456789"  # the duplicate flow verifies it
    for env in envs.values():
        assert env["DATABASE_URL"] == "postgresql://x/metis"
        assert env["METIS_TOKEN_OPS"] == "tok-ops-0123456789abcdef"
        assert env["METIS_LOG_LEVEL"] == "DEBUG" and env["PATH"] == "/usr/bin"
        assert env["METIS_DEDUPE_URL"] == "http://127.0.0.1:3"
    wf = stack.workflow_env(urls, externals)
    assert wf["METIS_GUARDRAILS_URL"] == "http://127.0.0.1:1"
    assert not [k for k in wf if any(s in k for s in ("TOKEN", "KEY", "SECRET", "PASSWORD"))]
    assert not {v for v in wf.values()} & {"emu-key-0123456789", "jira-tok-0123456789", "hook-secret-0123456789"}


def test_online_mode_points_guardrails_at_the_real_api():
    creds = {"anthropic_key": "emu", "jira_user": "u", "jira_token": "t", "jira_webhook_secret": "s",
             "salesforce_client_id": "i", "salesforce_client_secret": "c"}
    ext = stack.externals_from_emulators({"anthropic": "http://127.0.0.1:1"}, creds, real_anthropic_key="sk-real")
    assert not ext.offline
    assert ext.public["METIS_ANTHROPIC_URL"] == stack.ANTHROPIC_API_URL
    assert ext.secret["ANTHROPIC_API_KEY"].get() == "sk-real"


def test_n8n_refuses_secret_named_variables_in_its_environment(tmp_path: Path):
    cfg = n8n.N8nConfig(database_url="postgresql://postgres@127.0.0.1:5432/x", port=1, broker_port=2,
                        user_folder=tmp_path, log_dir=tmp_path, encryption_key=Secret("k" * 32),
                        n8n_token=Secret("t" * 32), workflow_env={"METIS_TOKEN_N8N": "t" * 32})
    with pytest.raises(n8n.N8nError, match="METIS_TOKEN_N8N"):
        n8n.base_env(cfg, n8n.N8nInstall(tmp_path))


def test_ports_come_from_the_environment_and_a_busy_port_is_named():
    ports = local.Ports.from_env({"METIS_GUARDRAILS_PORT": "18100", "METIS_N8N_PORT": "15678"})
    assert ports.services["guardrails"] == 18100 and ports.services["watch"] == 8104 and ports.n8n == 15678
    with pytest.raises(local.UpError, match="METIS_N8N_PORT"):
        local.Ports.from_env({"METIS_N8N_PORT": "five"})
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        env = {f"METIS_{s.upper()}_PORT": str(free_port()) for s in stack.SERVICES}
        env.update({f"METIS_EMU_{e.upper()}_PORT": str(free_port()) for e in local.EMULATOR_PORTS})
        env.update({"METIS_N8N_PORT": str(busy), "METIS_N8N_BROKER_PORT": str(free_port())})
        with pytest.raises(local.UpError, match=rf"n8n \({busy}\)"):
            local._check_ports_free(local.Ports.from_env(env))


def test_down_stops_exactly_the_tracked_process_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(local, "RUN", tmp_path)
    monkeypatch.setattr(local, "PIDS", tmp_path / "pids")
    monkeypatch.setattr(local, "STATE", tmp_path / "state.json")
    # A parent with a child in its own process group, like gunicorn or n8n with its task runner.
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    proc = spawn("fake", [sys.executable, "-c", code], env=dict(os.environ), url="http://127.0.0.1:1", log_dir=tmp_path)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(local._group_members(proc.popen.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        local.write_pidfile(proc)
        assert [i["alive"] for i in local.tracked()] == [True]
        assert local.down(quiet=True) == 0
        assert local._group_members(proc.popen.pid) == []
        assert bystander.poll() is None  # not ours: untouched
        assert local.tracked() == []
    finally:
        proc.stop()
        bystander.kill()
        bystander.wait()


def test_a_reused_pid_is_not_taken_for_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(local, "PIDS", tmp_path / "pids")
    (tmp_path / "pids").mkdir()
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # Same pid, different start time: a different process that happens to reuse the number.
        (tmp_path / "pids" / "old.json").write_text(
            f'{{"name": "old", "pid": {other.pid}, "start_ticks": 1, "url": "", "log": ""}}')
        assert [i["alive"] for i in local.tracked()] == [False]
    finally:
        other.kill()
        other.wait()


def test_database_url_that_does_not_answer_says_so(tmp_path: Path):
    with pytest.raises(postgres.PostgresNotFound, match="does not answer"):
        postgres.find({"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/metis"}, tmp_path)


def test_private_cluster_when_no_server_answers():
    run_dir = Path(f"/tmp/metis-pg-test-{os.getpid()}")  # the postgres user must reach it (pytest tmp is 0700)
    (run_dir / "pg").mkdir(parents=True)
    port = free_port()
    (run_dir / "pg" / "PORT").write_text(str(port))  # a free port instead of 5433
    nobody_home = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    try:
        server = postgres.find({"METIS_LOCAL_PG_URL": nobody_home}, run_dir)
        assert server.source == "private"
        assert server.database_url == f"postgresql://postgres@127.0.0.1:{port}/metis"
        assert postgres.ensure_database(server.admin_url, "metis") is True
        assert postgres.ensure_database(server.admin_url, "metis") is False
        with psycopg.connect(server.database_url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("metis",)
        # A second `make up` finds the running cluster again.
        assert postgres.find({"METIS_LOCAL_PG_URL": nobody_home}, run_dir).admin_url == server.admin_url
    finally:
        assert postgres.stop_private(run_dir / "pg")
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    assert not postgres.reachable(f"postgresql://postgres@127.0.0.1:{port}/postgres")


def test_run_dir_default_is_inside_the_clone():
    assert local.RUN == Path(os.environ.get("METIS_RUN_DIR", str(ROOT / ".run")))
