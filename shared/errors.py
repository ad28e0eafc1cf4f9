"""Errors as application/problem+json (RFC 9457) with stable codes."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, json
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class MetisError(Exception):
    """Base error: every error a service raises on purpose carries status, code and title."""

    status = 500
    code = "internal_error"
    title = "Internal server error"

    def __init__(self, detail: str | None = None, *, code: str | None = None, status: int | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        if code:
            self.code = code
        if status:
            self.status = status
        self.extra = extra or {}

    def to_problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"https://metis.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        body.update(self.extra)
        return body


class BadRequest(MetisError):
    status, code, title = 400, "bad_request", "Bad request"


class InvalidInput(MetisError):
    status, code, title = 400, "invalid_input", "Invalid input"


class Unauthorized(MetisError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class Forbidden(MetisError):
    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(MetisError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(MetisError):
    status, code, title = 409, "conflict", "Conflict"


class Unavailable(MetisError):
    status, code, title = 503, "unavailable", "Service unavailable"


def problem_response(status: int, code: str, title: str, detail: str, **extra: Any) -> Response:
    body = {"type": f"https://metis.dev/problems/{code}", "title": title, "status": status,
            "code": code, "detail": detail, **extra}
    rid = getattr(g, "request_id", None)
    if rid:
        body["request_id"] = rid
    return Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)


def register_error_handlers(app: Flask) -> None:
    """Every error, including routing 404/405 and unexpected 500s, leaves as problem+json."""

    @app.errorhandler(MetisError)
    def _metis(err: MetisError) -> Response:
        p = err.to_problem()
        extra = {k: v for k, v in p.items() if k not in {"type", "title", "status", "code", "detail"}}
        return problem_response(err.status, err.code, err.title, err.detail, **extra)

    @app.errorhandler(ValidationError)
    def _validation(err: ValidationError) -> Response:
        messages = err.messages if isinstance(err.messages, dict) else {"_schema": err.messages}
        fields = ", ".join(sorted(str(k) for k in messages))
        return problem_response(400, "invalid_input", "Invalid input", f"invalid fields: {fields}",
                                errors=messages)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException) -> Response:
        status = err.code or 500
        code = (err.name or "error").lower().replace(" ", "_")
        resp = problem_response(status, code, err.name or "Error", err.description or "")
        valid_methods = getattr(err, "valid_methods", None)
        if status == 405 and valid_methods:
            resp.headers["Allow"] = ", ".join(valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error")
        return problem_response(500, "internal_error", "Internal server error",
                                "an unexpected error occurred; see the service log with this request id")
