"""Application factory for the guardrails service — wiring only."""
from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import datetime
from typing import Any, Callable
from zoneinfo import ZoneInfo

import requests
from flask import Flask
from psycopg.rows import dict_row
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from shared.errors import problem_response
from shared.settings import Settings
from shared.web import create_service_app

from . import actions, service
from .actions_api import actions_api
from .actions_metrics import ActionsCollector
from .api import GATEWAY_PATHS, api, gateway_api
from .fastpath import GatewayFastPath
from .gateway import Gateway
from .metrics import LedgerCollector
from .policy import load_policy


def create_app(settings: Settings | None = None, *, anthropic_api_key: str | None = None,
               background: bool | None = None) -> Flask:
    """Build the guardrails app from explicit settings, else from the environment.

    An invalid policy.yaml / prices.yaml raises PolicyError listing every problem, so the service never starts
    with a policy it cannot enforce.
    """
    settings = settings or Settings.from_env("guardrails")
    extra = settings.extra
    policy = load_policy(settings.config_dir)
    for warning in policy.retirement_warnings(datetime.now(ZoneInfo(policy.timezone)).date()):
        logging.getLogger("metis.guardrails").warning("policy: %s", warning)
    # The gateway's own pool: autocommit (one round trip per ledger statement) and no borrow-time ping.
    # METIS_LEDGER_SYNC_COMMIT=off trades durability for latency: a reservation is acknowledged before its WAL
    # record reaches disk, so a PostgreSQL crash in the next ~0.6 s can forget it while the call it admitted
    # goes ahead (under-counting). Default on: a reservation is durable before any money is spent.
    sync_commit = extra.get("METIS_LEDGER_SYNC_COMMIT", "on")
    if sync_commit not in ("on", "off"):
        raise ValueError(f"METIS_LEDGER_SYNC_COMMIT must be on or off, got {sync_commit!r}")

    def configure(conn: Any) -> None:
        conn.execute(f"SET synchronous_commit = {sync_commit}")

    # Sized like every service (METIS_DB_POOL_MAX -> settings.db_pool_max) unless METIS_DB_POOL_SIZE says otherwise.
    max_size = int(extra.get("METIS_DB_POOL_SIZE", str(getattr(settings, "db_pool_max", 8))))
    pool = ConnectionPool(settings.database_url, min_size=min(int(extra.get("METIS_DB_POOL_MIN", "2")), max_size),
                          max_size=max_size,
                          kwargs={"row_factory": dict_row, "autocommit": True}, open=False, name="guardrails",
                          timeout=float(extra.get("METIS_DB_POOL_TIMEOUT", "3")), configure=configure)
    app = create_service_app(settings, apis=[api, gateway_api, actions_api], pool=pool, public_paths=GATEWAY_PATHS)
    state = app.extensions["metis"].state

    @app.errorhandler(psycopg.OperationalError)
    @app.errorhandler(PoolTimeout)
    def _ledger_down(err: Exception) -> Any:
        # Fail closed with a retryable status: nothing was opened, spent or recorded.
        return problem_response(503, "ledger_unavailable", "Service unavailable",
                                f"the guardrails database is unavailable ({type(err).__name__}); nothing was done")

    store = service.PolicyStore(pool, policy)
    store.record(policy, actor=f"startup:{socket.gethostname()}:{os.getpid()}")
    key = anthropic_api_key if anthropic_api_key is not None else os.environ.get("ANTHROPIC_API_KEY", "")
    state["policies"] = store
    state["gateway"] = Gateway(pool=pool, policies=store,
                               upstream_url=extra.get("METIS_ANTHROPIC_URL", "https://api.anthropic.com"),
                               api_key=key, timeout=float(extra.get("METIS_ANTHROPIC_TIMEOUT", "600")),
                               durable=sync_commit == "on")
    # POST /anthropic/v1/messages (+ count_tokens) skip Flask's per-request machinery: same checks and answers.
    app.wsgi_app = GatewayFastPath(app.wsgi_app, state["gateway"], settings)  # type: ignore[method-assign]
    state["metrics_collectors"] = [LedgerCollector(pool, store), ActionsCollector(pool)]
    state["actions"] = actions.ActionService(pool=pool, policies=store,
                                             executors=actions.executors_from_settings(settings))

    if background is None:
        # Default: on in served processes (gunicorn workers), off in an app built inside a test or a script.
        background = extra.get("METIS_GUARDRAILS_BACKGROUND", "1" if "gunicorn" in sys.modules else "0") == "1"
    run_background = background
    if run_background:
        state["background"] = _background(pool, store, settings)
        state["background"].start()
        # Writes and n8n hand-offs run on their own thread: a slow Jira never delays the budget sweeper.
        state["actions_background"] = actions.background(state["actions"], settings)
        state["actions_background"].start()
    return app


def _background(pool: ConnectionPool, store: service.PolicyStore, settings: Settings) -> service.Background:
    """Sweeper, alert outbox, heartbeat checker and watcher ping; every job is safe in many workers at once."""
    extra = settings.extra
    session = requests.Session()
    jobs: dict[str, tuple[float, Callable[[], Any]]] = {
        "sweeper": (float(extra.get("METIS_SWEEP_SECONDS", "5")), lambda: service.sweep_expired(pool, store.get())),
        "heartbeats": (float(extra.get("METIS_HEARTBEAT_CHECK_SECONDS", "15")),
                       lambda: service.check_heartbeats(pool, store.get())),
    }
    alert_url = extra.get("METIS_ALERT_WEBHOOK_URL")
    if alert_url:
        # The alert webhook is an n8n workflow whose header auth is the "Metis n8n token" credential.
        n8n_token = settings.caller_tokens.get("n8n")
        token = os.environ.get("METIS_ALERT_WEBHOOK_TOKEN") or (n8n_token.get() if n8n_token else None)
        jobs["alerts"] = (float(extra.get("METIS_ALERT_POLL_SECONDS", "2")),
                          lambda: service.deliver_alerts(pool, url=alert_url, token=token, session=session))
    watcher_url = extra.get("METIS_WATCHER_URL")
    if watcher_url:
        interval = float(extra.get("METIS_WATCHER_INTERVAL_SECONDS", "60"))
        jobs["watcher"] = (min(interval, 5.0), lambda: service.ping_watcher(
            pool, url=watcher_url, interval_seconds=interval, session=session))
    return service.Background(jobs)
