"""JSON logs carrying the request id and the n8n execution id."""
from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, Mapping

from flask import g, has_request_context
from pythonjsonlogger.json import JsonFormatter


# For code that serves a request outside Flask's request context (a WSGI fast path): the same three fields.
REQUEST_FIELDS: ContextVar[Mapping[str, Any] | None] = ContextVar("metis_request_fields", default=None)


class ContextFilter(logging.Filter):
    """Adds request_id / n8n_execution_id / caller to every record emitted during a request."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        if has_request_context():
            record.request_id = g.get("request_id")
            record.n8n_execution_id = g.get("n8n_execution_id")
            record.caller = g.get("caller")
        else:
            fields = REQUEST_FIELDS.get()
            if fields is not None:
                record.request_id = fields.get("request_id")
                record.n8n_execution_id = fields.get("n8n_execution_id")
                record.caller = fields.get("caller")
        return True


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route the root logger to stdout as one JSON object per line."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                       rename_fields={"levelname": "level", "asctime": "time"}))
    handler.addFilter(ContextFilter(service))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_metis", False):
            root.removeHandler(h)
    handler._metis = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
