"""A lean WSGI path for the gateway's two POST endpoints: the same checks and answers as the Flask route, without
Flask's per-request machinery (request context, hook chain, Response object, werkzeug header structures).

Every other request — other methods on these paths included — goes to the Flask app unchanged. What the shared
hooks do for a request is done here too, explicitly: a request id (the caller's `X-Request-Id` when well-formed,
echoed back), the n8n execution id, the caller authenticated from `x-api-key` or `Authorization: Bearer` with
the shared constant-time check, the JSON log fields (request id, execution id, caller), the HTTP metrics with the
same names and labels (`endpoint` = the route), `Cache-Control: no-store`, and a JSON error (Anthropic's shape,
which the SDK reads) for an unexpected failure.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Mapping

from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_input_stream

from shared.auth import identify_caller
from shared.errors import Unauthorized
from shared.logs import REQUEST_FIELDS
from shared.metrics import HTTP_LATENCY, HTTP_REQUESTS
from shared.settings import Settings
from shared.web import _REQUEST_ID

from .gateway import Gateway, GatewayResponse, anthropic_error

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

MESSAGES = "/anthropic/v1/messages"
COUNT_TOKENS = "/anthropic/v1/messages/count_tokens"


class EnvironHeaders(Mapping[str, str]):
    """Read-only request headers straight from the WSGI environ (what the gateway reads: a handful of names)."""

    __slots__ = ("_env",)

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self._env = environ

    @staticmethod
    def _key(name: str) -> str:
        key = name.upper().replace("-", "_")
        return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key

    def get(self, name: str, default: Any = None) -> Any:
        value = self._env.get(self._key(name))
        return default if value is None else value

    def __getitem__(self, name: str) -> str:
        value = self._env.get(self._key(name))
        if value is None:
            raise KeyError(name)
        return str(value)

    def __iter__(self) -> Iterator[str]:
        for k in self._env:
            if k.startswith("HTTP_"):
                yield k[5:].replace("_", "-").title()
            elif k in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                yield k.replace("_", "-").title()

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _status_line(code: int) -> str:
    return f"{code} {HTTP_STATUS_CODES.get(code, 'unknown').upper()}"


class GatewayFastPath:
    """WSGI middleware: `app.wsgi_app = GatewayFastPath(app.wsgi_app, gateway, settings)`."""

    def __init__(self, wsgi_app: WsgiApp, gateway: Gateway, settings: Settings) -> None:
        self._next = wsgi_app
        self._settings = settings
        self._service = settings.service
        self._routes: dict[str, Callable[[bytes, Mapping[str, str], str], GatewayResponse]] = {
            MESSAGES: gateway.messages, COUNT_TOKENS: gateway.count_tokens}
        self._status: dict[int, str] = {}
        self._requests: dict[tuple[str, int], Any] = {}
        self._latency = {path: HTTP_LATENCY.labels(self._service, path) for path in self._routes}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        fn = self._routes.get(environ.get("PATH_INFO", "")) if environ.get("REQUEST_METHOD") == "POST" else None
        if fn is None:
            return self._next(environ, start_response)
        t0 = time.perf_counter()
        path = environ["PATH_INFO"]
        rid = environ.get("HTTP_X_REQUEST_ID", "")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        exec_id = environ.get("HTTP_X_N8N_EXECUTION_ID", "")
        fields: dict[str, Any] = {"request_id": rid, "n8n_execution_id": exec_id if _REQUEST_ID.match(exec_id)
                                  else None, "caller": None}
        token = REQUEST_FIELDS.set(fields)
        try:
            r = self._handle(fn, environ, fields)
        finally:
            REQUEST_FIELDS.reset(token)
        headers = list(r.headers.items())
        if "content-type" not in r.headers and "Content-Type" not in r.headers:
            headers.append(("Content-Type", "application/json"))
        if r.stream is None:
            headers.append(("Content-Length", str(len(r.body))))
        headers += [("X-Metis-Worker", str(os.getpid())), ("X-Request-Id", rid), ("Cache-Control", "no-store")]
        status = self._status.get(r.status)
        if status is None:
            status = self._status[r.status] = _status_line(r.status)
        self._latency[path].observe(time.perf_counter() - t0)
        counter = self._requests.get((path, r.status))
        if counter is None:
            counter = self._requests[(path, r.status)] = HTTP_REQUESTS.labels(self._service, "POST", path,
                                                                             str(r.status))
        counter.inc()
        start_response(status, headers)
        # A stream is relayed as it arrives; the server closes it when the client goes away (the gateway then
        # settles the reservation at its worst case).
        return r.stream if r.stream is not None else [r.body]

    def _handle(self, fn: Callable[[bytes, Mapping[str, str], str], GatewayResponse], environ: dict[str, Any],
                fields: dict[str, Any]) -> GatewayResponse:
        key = environ.get("HTTP_X_API_KEY")
        try:
            caller = identify_caller(f"Bearer {key}" if key else environ.get("HTTP_AUTHORIZATION"),
                                     self._settings.caller_tokens)
        except Unauthorized as exc:
            return anthropic_error(401, "authentication_error", exc.detail, retry=False)
        fields["caller"] = caller
        try:
            raw = get_input_stream(environ).read()
            return fn(raw, EnvironHeaders(environ), caller)
        except Exception:  # the Flask app's last-resort handler, in the gateway's error shape
            log.exception("unhandled error in the LLM gateway")
            return anthropic_error(500, "api_error", "an unexpected error occurred in the guardrails gateway; see "
                                   f"its log with request id {fields['request_id']}")
