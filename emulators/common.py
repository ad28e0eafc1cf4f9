"""What every HTTP emulator shares: fault injection, request recording, id generation, a quiet threaded server."""
from __future__ import annotations

import base64
import fnmatch
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from flask import Flask, Request, Response, jsonify, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

SECRET_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "x-hub-signature", "proxy-authorization"})
_NO_SYMBOLS = str.maketrans({"+": "x", "/": "z", "=": "q"})


def random_id(prefix: str, length: int = 24) -> str:
    """An opaque base62-looking id like the real services hand out (`msg_…`, `req_…`)."""
    raw = base64.b64encode(os.urandom(length)).decode()[:length]
    return prefix + raw.translate(_NO_SYMBOLS)


def safe_headers(req: Request) -> dict[str, str]:
    """Request headers with secrets redacted (recorded requests must never leak keys)."""
    return {k: ("[redacted]" if k.lower() in SECRET_HEADERS else v) for k, v in req.headers.items()}


@dataclass
class FaultRule:
    """One injected fault: the next `count` calls whose path matches `path` (glob) get `status` or a dropped connection."""

    path: str
    method: str | None = None
    status: int = 503
    count: int | None = 1
    retry_after: str | None = None
    retry_after_ms: str | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    down: bool = False
    delay_seconds: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        return fnmatch.fnmatchcase(path, self.path)


class FaultInjector:
    """Thread-safe list of fault rules consulted before every non-control request."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()

    def add(self, spec: dict[str, Any]) -> FaultRule:
        """Register a rule from a JSON spec (keys as in FaultRule)."""
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            raise ValueError("fault needs a 'path' glob, e.g. '/rest/api/3/issue/*'")
        count = spec.get("count", 1)
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError("'count' must be a positive integer or null (until cleared)")
        status = int(spec.get("status", 503))
        if not 100 <= status <= 599:
            raise ValueError("'status' must be an HTTP status code")
        ra = spec.get("retry_after")
        ra_ms = spec.get("retry_after_ms")
        rule = FaultRule(path=spec["path"], method=spec.get("method"), status=status, count=count,
                         retry_after=None if ra is None else str(ra),
                         retry_after_ms=None if ra_ms is None else str(ra_ms),
                         body=spec.get("body"), headers=dict(spec.get("headers") or {}),
                         down=bool(spec.get("down", False)), delay_seconds=float(spec.get("delay_seconds", 0)))
        with self._lock:
            self._rules.append(rule)
        return rule

    def take(self, method: str, path: str) -> FaultRule | None:
        """The first matching rule, consuming one of its uses."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    if rule.count is not None:
                        rule.count -= 1
                        if rule.count <= 0:
                            self._rules.remove(rule)
                    return rule
        return None

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"path": r.path, "method": r.method, "status": r.status, "remaining": r.count,
                     "down": r.down, "hits": r.hits} for r in self._rules]


def drop_connection() -> Response:
    """Simulate a dead upstream: shut the client socket so the caller sees a connection error."""
    sock = request.environ.get("werkzeug.socket")
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    return Response(b"", status=503)


def apply_fault(rule: FaultRule, default_body: Callable[[int], Any]) -> Response:
    """Turn a matched fault rule into a response (or a dropped connection)."""
    if rule.delay_seconds:
        time.sleep(rule.delay_seconds)
    if rule.down:
        return drop_connection()
    body = rule.body if rule.body is not None else default_body(rule.status)
    resp = jsonify(body) if not isinstance(body, str) else Response(body, mimetype="text/plain")
    resp.status_code = rule.status
    if rule.retry_after is not None:
        resp.headers["Retry-After"] = rule.retry_after
    if rule.retry_after_ms is not None:
        resp.headers["retry-after-ms"] = rule.retry_after_ms
    for k, v in rule.headers.items():
        resp.headers[k] = v
    return resp


class Recorder:
    """A bounded, thread-safe log of what an emulator received (so benchmarks cannot exhaust memory)."""

    def __init__(self, limit: int = 10_000) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=limit)
        self._lock = threading.Lock()
        self._seq = 0

    def add(self, item: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            item = {"seq": self._seq, "at": time.time(), **item}
            self._items.append(item)
            return item

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def json_body_or_none(req: Request) -> Any:
    """The parsed JSON body, or None if it is not valid JSON."""
    return req.get_json(silent=True, force=True)


def control_json() -> dict[str, Any]:
    """Body of a control request (must be a JSON object)."""
    body = request.get_json(silent=True, force=True)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ValueError("control request body must be a JSON object")
    return body


def add_control_error_handler(app: Flask) -> None:
    """ValueError from control endpoints → 400 JSON (control API only, not the emulated API)."""

    @app.errorhandler(ValueError)
    def _bad_control(exc: ValueError) -> tuple[Response, int]:
        return jsonify({"error": str(exc)}), 400


class _Handler(WSGIRequestHandler):
    # HTTP/1.1 keeps connections alive (clients pool them); werkzeug chunks responses without a length.
    protocol_version = "HTTP/1.1"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:  # quiet: benchmarks hit us hard
        return

    def log_error(self, format: str, *args: Any) -> None:
        return


class HttpServer:
    """A threaded werkzeug server running one Flask app in a background thread."""

    def __init__(self, name: str, app: Flask, host: str, port: int) -> None:
        self.name = name
        self.server: BaseWSGIServer = make_server(host, port, app, threaded=True, request_handler=_Handler)
        self.server.daemon_threads = True  # type: ignore[attr-defined]  # ThreadedWSGIServer
        self.host = host
        self.port = int(self.server.server_port)
        # A short poll interval keeps shutdown (SIGTERM → exit) quick.
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"emu-{name}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def first(items: Iterable[Any], pred: Callable[[Any], bool]) -> Any:
    """The first item satisfying pred, else None."""
    for item in items:
        if pred(item):
            return item
    return None


def add_control_routes(app: Flask, name: str, *, faults: FaultInjector, reset: Callable[[], None]) -> None:
    """The control endpoints every emulator shares: fault injection, reset and health."""

    @app.post(f"/_emulator/{name}/faults")
    def add_fault() -> Response:
        faults.add(control_json())
        return jsonify({"faults": faults.describe()})

    @app.delete(f"/_emulator/{name}/faults")
    def clear_faults() -> Response:
        faults.clear()
        return jsonify({"ok": True})

    @app.post("/_emulator/reset")
    def reset_state() -> Response:
        reset()
        faults.clear()
        return jsonify({"ok": True})

    @app.get("/_emulator/health")
    def health() -> Response:
        return jsonify({"ok": True, "emulator": name})
