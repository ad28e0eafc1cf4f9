"""The common application factory every service builds on: auth, request ids, errors, health, metrics, OpenAPI."""
from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from flask import Flask, Response, current_app, g, jsonify, request
from marshmallow import Schema, fields
from psycopg_pool import ConnectionPool

from . import db
from .api import Api, build_openapi, register_apis
from .auth import PUBLIC_PATHS, install_auth
from .errors import register_error_handlers
from .logs import configure_logging
from .metrics import instrument, metrics_response
from .settings import Settings

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

ReadyCheck = Callable[[], None]


@dataclass
class ServiceContext:
    """What a request handler needs: the settings, the pool, and service-specific objects."""

    settings: Settings
    pool: ConnectionPool
    ready_checks: dict[str, ReadyCheck] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


class WhoAmIRead(Schema):
    service = fields.String(required=True)
    caller = fields.String(required=True)
    request_id = fields.String(required=True)
    n8n_execution_id = fields.String(allow_none=True)


def system_api(settings: Settings) -> Api:
    """Endpoints every service has beyond health: who is calling (proves auth and request ids end to end)."""
    api = Api(f"{settings.service}_system", __name__)

    @api.route("/v1/whoami", response=WhoAmIRead)
    def whoami() -> dict[str, Any]:
        """Who the service thinks is calling, with the request and n8n execution ids it saw."""
        return {"service": settings.service, "caller": g.caller, "request_id": g.request_id,
                "n8n_execution_id": g.n8n_execution_id}

    return api


def ctx() -> ServiceContext:
    return current_app.extensions["metis"]  # type: ignore[no-any-return]


def create_service_app(settings: Settings, *, apis: Iterable[Api], version: str = "0.1.0",
                       pool: ConnectionPool | None = None, migrate: bool = True,
                       ready_checks: dict[str, ReadyCheck] | None = None,
                       public_paths: Iterable[str] = ()) -> Flask:
    """Wire a service: nothing happens at import time, everything from `settings`.

    `public_paths` skip the shared bearer check (a path that authenticates its callers itself, e.g. the
    guardrails LLM gateway, which also accepts the Anthropic SDK's x-api-key header)."""
    configure_logging(settings.service, settings.log_level)
    app = Flask(f"metis.{settings.service}")
    app.config["JSON_SORT_KEYS"] = False
    if migrate:
        db.migrate(settings.database_url, settings.service)
    pool = pool or db.make_pool(settings.database_url, max_size=settings.db_pool_max, name=settings.service)
    pool.open(wait=False)
    service_ctx = ServiceContext(settings=settings, pool=pool)
    service_ctx.ready_checks["database"] = lambda: db.ping(pool)
    service_ctx.ready_checks.update(ready_checks or {})
    app.extensions["metis"] = service_ctx

    @app.before_request
    def _request_ids() -> None:
        rid = request.headers.get("X-Request-Id", "")
        g.request_id = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        exec_id = request.headers.get("X-N8N-Execution-Id", "")
        g.n8n_execution_id = exec_id if _REQUEST_ID.match(exec_id) else None

    app.before_request(install_auth(lambda: settings.caller_tokens, PUBLIC_PATHS | frozenset(public_paths)))
    instrument(app, settings.service)

    @app.after_request
    def _echo_request_id(resp: Response) -> Response:
        if g.get("request_id"):
            resp.headers["X-Request-Id"] = g.request_id
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    register_error_handlers(app)
    registered = register_apis(app, [system_api(settings), *apis])
    spec = build_openapi(f"Metis {settings.service}", version, registered)

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok", service=settings.service)

    @app.get("/readyz")
    def readyz() -> Any:
        checks: dict[str, str] = {}
        ok = True
        for name, check in service_ctx.ready_checks.items():
            try:
                check()
                checks[name] = "ok"
            except Exception as exc:  # a readiness probe reports every failure, it never raises
                ok = False
                checks[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
        return jsonify(status="ok" if ok else "unavailable", checks=checks), (200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return metrics_response(service_ctx.state.get("metrics_collectors", ()))

    @app.get("/openapi.json")
    def openapi() -> Any:
        return jsonify(spec)

    return app
