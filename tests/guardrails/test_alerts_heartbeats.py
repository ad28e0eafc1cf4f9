"""Spend alerts (once per threshold per period, retried, never twice), heartbeats overdue / recovery, watcher ping."""
from __future__ import annotations

import json
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
import requests

from devstack.processes import free_port, start_service
from services.guardrails import repository as repo
from services.guardrails import service
from shared.guardrails_client import BudgetDenied
from tests.conftest import TEST_TOKENS, auth
from tests.guardrails.conftest import write_config
from tests.guardrails.test_ledger import make_run


class Receiver:
    """A real HTTP endpoint standing in for the n8n alert webhook / the external watcher."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail_next = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer.lock:
                    fail = outer.fail_next > 0
                    outer.fail_next -= 1 if fail else 0
                    if not fail:
                        outer.received.append({"body": body, "headers": dict(self.headers)})
                self.send_response(503 if fail else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def _spend(gr, run_id, micros: int) -> None:
    with gr.pool.connection() as conn:
        res = uuid.uuid4()
        assert repo.reserve(conn, reservation_id=res, run_id=run_id, caller="t", model="m", amount_micros=micros,
                            tokens=1, caps=service.period_caps(gr.policy, "triage"), timeout_seconds=60,
                            audit={})["ok"]
        repo.settle(conn, reservation_id=res, state="settled", cost_micros=micros, used_tokens=1,
                    thresholds=gr.policy.thresholds_percent, audit_kind="llm.call", audit={})


def test_spend_alerts_once_per_threshold_retried_never_twice(guardrails, receiver, sql):
    # Daily cap $1 (test policy): spend 0.3, 0.3 (crosses 50 %), 0.1, 0.15 (crosses 80 %), 0.15 (100 %).
    with guardrails.pool.connection() as conn:
        rid = make_run(conn, "triage", 10 ** 9, 10 ** 9)
    for micros in (300_000, 300_000, 100_000, 150_000, 150_000):
        _spend(guardrails, rid, micros)
    keys = [r["dedupe_key"] for r in sql.execute("SELECT dedupe_key FROM guardrails.alert_outbox "
                                                 "WHERE kind = 'spend_threshold' ORDER BY id").fetchall()]
    day = service.period_caps(guardrails.policy, "triage")[1]["period"]
    # Daily ($1) crossed 50/80/100; monthly ($5) crossed nothing; task triage ($5/day) nothing.
    assert keys == [f"spend:daily:{day}:50", f"spend:daily:{day}:80", f"spend:daily:{day}:100"]
    receiver.fail_next = 2  # the webhook is down for the first two attempts
    session = requests.Session()
    token = TEST_TOKENS["guardrails"].get()
    first = service.deliver_alerts(guardrails.pool, url=receiver.url, token=token, session=session)
    assert first == {"sent": 1, "failed": 2}
    sql.execute("UPDATE guardrails.alert_outbox SET next_attempt_at = now()")  # skip the backoff wait

    # Several deliverers at once (workers / replicas): SKIP LOCKED means each alert goes out once.
    threads = [threading.Thread(target=service.deliver_alerts, args=(guardrails.pool,),
                                kwargs={"url": receiver.url, "token": token, "session": requests.Session()})
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert service.deliver_alerts(guardrails.pool, url=receiver.url, token=token, session=session) == \
        {"sent": 0, "failed": 0}
    got = sorted(r["body"]["threshold_percent"] for r in receiver.received)
    assert got == [50, 80, 100]
    assert all(r["headers"]["Authorization"] == f"Bearer {token}" for r in receiver.received)
    assert "reached 100% of the daily cap" in [r for r in receiver.received
                                               if r["body"]["threshold_percent"] == 100][0]["body"]["text"]
    # More spend in the same period never re-alerts a threshold.
    _spend(guardrails, rid, 0)
    assert sql.execute("SELECT count(*) AS n FROM guardrails.alert_outbox").fetchone()["n"] == 3


def test_heartbeats_overdue_alert_once_and_recover(guardrails, sql):
    c = guardrails.client("digest")
    assert c.heartbeat("fast-job")["status"] == "ok"
    with pytest.raises(Exception) as exc:
        c.heartbeat("no-such-job")
    assert getattr(exc.value, "code", None) == "unknown_heartbeat"
    assert service.check_heartbeats(guardrails.pool, guardrails.policy) == []
    # fast-job: interval 60 s, grace 0. Make its last check-in 61 s old.
    sql.execute("UPDATE guardrails.heartbeats SET last_at = now() - interval '61 seconds' WHERE name = 'fast-job'")
    assert service.check_heartbeats(guardrails.pool, guardrails.policy) == ["fast-job"]
    assert service.check_heartbeats(guardrails.pool, guardrails.policy) == []  # once per overdue episode
    listing = {h["name"]: h for h in requests.get(guardrails.url + "/v1/heartbeats", headers=auth("ops"),
                                                   timeout=5).json()}
    assert listing["fast-job"]["status"] == "overdue" and listing["digest-stale-scan"]["status"] == "ok"
    text = requests.get(guardrails.url + "/metrics", timeout=5).text
    assert 'metis_heartbeat_overdue{name="fast-job"} 1.0' in text
    back = c.heartbeat("fast-job")
    assert back["recovered"] is True
    listing = {h["name"]: h for h in requests.get(guardrails.url + "/v1/heartbeats", headers=auth("ops"),
                                                   timeout=5).json()}
    assert listing["fast-job"]["status"] == "ok" and listing["fast-job"]["beats"] == 2
    kinds = [r["kind"] for r in sql.execute("SELECT kind FROM guardrails.alert_outbox ORDER BY id").fetchall()]
    assert kinds == ["heartbeat_overdue", "heartbeat_recovered"]
    audit = [r["kind"] for r in sql.execute("SELECT kind FROM guardrails.audit_log WHERE kind LIKE 'heartbeat%%' "
                                            "ORDER BY seq").fetchall()]
    assert audit == ["heartbeat.overdue", "heartbeat.recovered"]
    # A second episode alerts again.
    sql.execute("UPDATE guardrails.heartbeats SET last_at = now() - interval '61 seconds' WHERE name = 'fast-job'")
    assert service.check_heartbeats(guardrails.pool, guardrails.policy) == ["fast-job"]


def test_watcher_is_pinged_once_per_interval(guardrails, receiver):
    s = requests.Session()
    assert service.ping_watcher(guardrails.pool, url=receiver.url, interval_seconds=3600, session=s) is True
    assert service.ping_watcher(guardrails.pool, url=receiver.url, interval_seconds=3600, session=s) is False
    (ping,) = receiver.received
    assert ping["body"]["service"] == "guardrails" and ping["body"]["audit_head_seq"] >= 1


def test_served_guardrails_delivers_alerts_and_pings_watcher_in_background(database_url, receiver, tmp_path):
    """Under gunicorn with two workers: the background loops deliver each alert exactly once."""
    env = {**os.environ, "DATABASE_URL": database_url, "METIS_CONFIG_DIR": str(write_config(tmp_path / "cfg")),
           "METIS_ALERT_WEBHOOK_URL": receiver.url, "METIS_ALERT_POLL_SECONDS": "0.2",
           "METIS_WATCHER_URL": receiver.url.replace("/hook", "/watch"), "METIS_WATCHER_INTERVAL_SECONDS": "3600",
           **{f"METIS_TOKEN_{k.upper()}": v.get() for k, v in TEST_TOKENS.items()}}
    proc = start_service("guardrails", env=env, port=free_port(), log_dir=tmp_path, workers=2)
    try:
        for i in range(3):
            requests.post(proc.url + "/v1/kill-switch/" + ("engage" if i % 2 == 0 else "release"),
                          json={"actor": "ops", "reason": f"drill {i}"}, headers=auth("ops"), timeout=5)
        deadline = __import__("time").monotonic() + 15
        while __import__("time").monotonic() < deadline:
            with receiver.lock:
                alerts = [r for r in receiver.received if r["body"].get("kind", "").startswith("kill_switch")]
                pings = [r for r in receiver.received if r["body"].get("service") == "guardrails"]
            if len(alerts) >= 3 and pings:
                break
            __import__("time").sleep(0.1)
        pending = requests.get(proc.url + "/v1/alerts", params={"pending": "true"}, headers=auth("ops"),
                               timeout=5).json()
        assert pending == []
        assert sorted(a["body"]["reason"] for a in alerts) == ["drill 0", "drill 1", "drill 2"]
        assert len(pings) == 1
        with pytest.raises(BudgetDenied):
            from shared.guardrails_client import GuardrailsClient
            GuardrailsClient(proc.url, TEST_TOKENS["digest"]).open_run("digest", trigger="schedule")
    finally:
        proc.stop()
