"""A real crash between a write and its record: a gunicorn guardrails is SIGKILLed after Jira took the comment
but before the answer came back. The retry that follows must find the comment instead of writing it again."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from devstack.processes import free_port, start_service
from devstack.stack import service_env
from tests.conftest import TEST_TOKENS, auth
from tests.fixtures.processes import emulator_externals
from tests.guardrails.actions_support import Writes, make_writes  # noqa: F401 (fixture)
from tests.guardrails.conftest import write_config

ROOT = Path(__file__).resolve().parents[2]
POLICY = {"actions": {
    "rules": [{"name": "comments-now", "action": "jira.add_comment", "mode": "allow", "projects": ["SUP"]}],
    "execution": {"http_attempts": 1, "request_timeout_seconds": 3, "retry_budget_seconds": 0, "lease_seconds": 5}}}


class StallingJira:
    """Forwards to the Jira emulator; once a comment has been written there, it never answers the writer."""

    def __init__(self, upstream: str) -> None:
        self.written = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                resp = requests.request(self.command, upstream + self.path, data=body, headers=headers, timeout=10)
                if self.command == "POST" and self.path.endswith("/comment") and resp.status_code == 201:
                    outer.written.set()
                    outer.release.wait(30)  # the answer never reaches the worker: it dies waiting
                    return
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_POST = do_PUT = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def stalling_jira(emu: Any) -> Iterator[StallingJira]:
    proxy = StallingJira(emu.jira_url)
    yield proxy
    proxy.close()


def test_sigkill_after_the_write_then_a_retry_writes_nothing_more(make_writes: Any, stalling_jira: StallingJira,
                                                                  emu: Any, database_url: str,
                                                                  tmp_path: Path) -> None:
    w: Writes = make_writes(POLICY)  # in-process guardrails on the same database: the one that survives
    run, key = w.open_run(), w.issue()
    env = service_env("guardrails", base=os.environ, database_url=database_url, tokens=TEST_TOKENS, urls={},
                      externals=emulator_externals(emu), config_dir=str(write_config(tmp_path / "cfg", POLICY)))
    env.update({"METIS_JIRA_URL": stalling_jira.url, "METIS_GUARDRAILS_BACKGROUND": "0"})
    doomed = start_service("guardrails", env=env, port=free_port(), log_dir=tmp_path, workers=1)
    body = {"run_id": run, "connector": "jira", "operation": "add_comment", "target": key,
            "payload": {"body": "Exactly once, even across a crash."}, "idempotency_key": "crash-1", "reason": "t"}
    try:
        pending = threading.Thread(target=lambda: _ignore(lambda: requests.post(
            doomed.url + "/v1/actions", json=body, headers=auth("triage"), timeout=30)), daemon=True)
        pending.start()
        assert stalling_jira.written.wait(20), doomed.log_tail()
        os.killpg(doomed.popen.pid, signal.SIGKILL)  # the worker dies between the write and its record
        doomed.popen.wait(10)
    finally:
        doomed.stop()
    assert len(w.comments(key)) == 1
    row = w.sql("SELECT id::text, status, attempts FROM guardrails.actions")[0]
    assert (row["status"], row["attempts"]) == ("executing", 1)

    # The client retries with the same key. Inside the lease the execution counts as in flight ...
    w.svc.wait_seconds = 0.2
    r = w.call("POST", "/v1/actions", json=body)
    assert (r.status_code, r.json()["status"]) == (200, "executing")
    # ... after it, the survivor takes over: it looks in Jira first, finds the comment, writes nothing.
    lease = w.sql("SELECT extract(epoch FROM lease_until - now()) AS s FROM guardrails.actions")[0]["s"]
    time.sleep(max(0.0, float(lease)) + 0.1)
    w.svc.wait_seconds = 30.0
    a = w.call("POST", "/v1/actions", json=body).json()
    assert (a["status"], a["attempts"]) == ("executed", 2)
    comments = w.comments(key)
    assert len(comments) == 1 and a["result"]["comment_id"] == comments[0]["id"]
    history = w.call("GET", f"/v1/actions/{row['id']}", caller="ops").json()["history"]
    assert [(h["attempt"], h["outcome"]) for h in history] == [(1, "abandoned"), (2, "reconciled")]
    assert w.kinds(row["id"]) == ["action.proposed", "action.recovered", "action.executed"]


def _ignore(fn: Any) -> None:
    try:
        fn()
    except requests.RequestException:
        pass  # the server it talked to was killed


def test_no_crash_needed_for_an_abandoned_execution_to_be_recovered_by_the_sweeper(make_writes: Any) -> None:
    """Nobody retries: the background sweep finds the expired lease and finishes the action."""
    w: Writes = make_writes(POLICY)
    run, key = w.open_run(), w.issue()
    action_id = uuid.uuid4()
    # The state a crashed worker leaves: claimed (executing, attempt 1) with the lease run out, nothing written.
    w.sql("INSERT INTO guardrails.actions (id, run_id, task, caller, connector, operation, target, payload, "
          "idempotency_key, fingerprint, rule, mode, policy_reason, status, attempts, lease_until) "
          "VALUES (%s, %s, 'triage', 'triage', 'jira', 'add_comment', %s, %s::jsonb, 'abandoned-1', 'x', "
          "'comments-now', 'allow', 'test', 'executing', 1, now() - interval '1 second')",
          action_id, run, key,
          '{"body": {"type": "doc", "version": 1, "content": [{"type": "paragraph", "content": '
          '[{"type": "text", "text": "Never sent before the crash."}]}]}, "internal": false}')
    w.svc.sweep()  # (another replica's sweeper on this database may get there first: the outcome is the same)
    got = w.call("GET", f"/v1/actions/{action_id}", caller="ops").json()
    assert (got["status"], got["attempts"]) == ("executed", 2)
    assert [c["text"].strip() for c in w.comments(key)] == ["Never sent before the crash."]
