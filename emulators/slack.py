"""Slack incoming-webhook emulator: `POST /services/T…/B…/<secret>` answers like hooks.slack.com.

200 `ok` for a valid message; 400 `invalid_payload` (not JSON / not an object), 400 `no_text` (neither
`text` nor `blocks`), 400 `invalid_blocks` (Block Kit limits broken), 404 `no_service` (unknown or revoked
URL), 429 / 5xx through fault injection. Every accepted message is recorded for
`GET /_emulator/slack/messages`.
"""
from __future__ import annotations

import json
import re
import threading
from typing import Any
from urllib.parse import parse_qs

from flask import Flask, Response, jsonify, request

from emulators.common import FaultInjector, add_control_routes, Recorder, add_control_error_handler, apply_fault, control_json

PATH_RE = re.compile(r"^T[A-Z0-9]{2,}/B[A-Z0-9]{2,}/[A-Za-z0-9]{8,64}$")
BLOCK_TYPES = {"section", "divider", "actions", "context", "header", "image", "input", "rich_text", "video", "file",
               "markdown", "table"}
MAX_BLOCKS = 50


def _plain(resp_text: str, status: int) -> Response:
    return Response(resp_text, status=status, mimetype="text/html")


def _text_obj(obj: Any, limit: int, plain_only: bool = False) -> bool:
    return (isinstance(obj, dict) and obj.get("type") in (("plain_text",) if plain_only else ("plain_text", "mrkdwn"))
            and isinstance(obj.get("text"), str) and 0 < len(obj["text"]) <= limit)


def _element_ok(el: Any) -> bool:
    if not isinstance(el, dict) or not isinstance(el.get("type"), str):
        return False
    if el["type"] == "button":
        if not _text_obj(el.get("text"), 75, plain_only=True):
            return False
        if "url" in el and not (isinstance(el["url"], str) and 0 < len(el["url"]) <= 3000):
            return False
        if "style" in el and el["style"] not in ("primary", "danger"):
            return False
        if "action_id" in el and not (isinstance(el["action_id"], str) and len(el["action_id"]) <= 255):
            return False
        if "value" in el and not (isinstance(el["value"], str) and len(el["value"]) <= 2000):
            return False
    return True


def blocks_error(blocks: Any) -> str | None:
    """Why a `blocks` array breaks Block Kit's rules (the checks Slack answers `invalid_blocks` for), or None."""
    if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
        return "blocks must be a list of at most 50 blocks"
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") not in BLOCK_TYPES:
            return f"block {i}: unknown type"
        if "block_id" in b and not (isinstance(b["block_id"], str) and len(b["block_id"]) <= 255):
            return f"block {i}: block_id too long"
        t = b["type"]
        if t == "section":
            if "text" not in b and "fields" not in b:
                return f"block {i}: section needs text or fields"
            if "text" in b and not _text_obj(b["text"], 3000):
                return f"block {i}: section text must be a text object of 1-3000 characters"
            fields = b.get("fields", [])
            if not isinstance(fields, list) or len(fields) > 10 or not all(_text_obj(f, 2000) for f in fields):
                return f"block {i}: at most 10 fields of up to 2000 characters"
            if "accessory" in b and not _element_ok(b["accessory"]):
                return f"block {i}: invalid accessory"
        elif t == "header":
            if not _text_obj(b.get("text"), 150, plain_only=True):
                return f"block {i}: header needs plain_text of 1-150 characters"
        elif t == "actions":
            els = b.get("elements")
            if not isinstance(els, list) or not 1 <= len(els) <= 25 or not all(_element_ok(e) for e in els):
                return f"block {i}: actions need 1-25 valid elements"
        elif t == "context":
            els = b.get("elements")
            if not isinstance(els, list) or not 1 <= len(els) <= 10:
                return f"block {i}: context needs 1-10 elements"
        elif t == "image":
            if not isinstance(b.get("image_url") or b.get("slack_file"), (str, dict)) or not isinstance(b.get("alt_text"), str):
                return f"block {i}: image needs image_url and alt_text"
    return None


def create_app() -> tuple[Flask, Recorder]:
    """The Flask app of the Slack incoming-webhook emulator."""
    app = Flask("emulators.slack")
    messages = Recorder()
    faults = FaultInjector()
    revoked: set[str] = set()
    lock = threading.Lock()
    add_control_error_handler(app)

    @app.before_request
    def gate() -> Response | None:
        if request.path.startswith("/_emulator/"):
            return None
        rule = faults.take(request.method, request.path)
        if rule is not None:
            return apply_fault(rule, lambda s: "rate_limited" if s == 429 else "service_unavailable")
        return None

    @app.post("/services/<path:hook>")
    def incoming(hook: str) -> Response:
        with lock:
            dead = hook in revoked
        if not PATH_RE.match(hook) or dead:
            return _plain("no_service", 404)
        raw = request.get_data(cache=True)
        ctype = (request.content_type or "").split(";")[0].strip().lower()
        try:
            if ctype == "application/x-www-form-urlencoded":
                payload = json.loads(parse_qs(raw.decode())["payload"][0])
            else:
                payload = json.loads(raw or b"")
        except (ValueError, KeyError, UnicodeDecodeError):
            return _plain("invalid_payload", 400)
        if not isinstance(payload, dict):
            return _plain("invalid_payload", 400)
        text = payload.get("text")
        blocks = payload.get("blocks")
        attachments = payload.get("attachments")
        if not (isinstance(text, str) and text.strip()) and not blocks and not attachments:
            return _plain("no_text", 400)
        if blocks is not None and blocks_error(blocks):
            return _plain("invalid_blocks", 400)
        team, channel, _secret = hook.split("/")
        messages.add({"webhook": f"{team}/{channel}", "team": team, "channel": channel, "text": text,
                      "blocks": blocks, "payload": payload,
                      "headers": {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "user-agent")}})
        return _plain("ok", 200)

    @app.get("/_emulator/slack/messages")
    def list_messages() -> Response:
        return jsonify({"messages": messages.all()})

    @app.post("/_emulator/slack/revoke")
    def revoke() -> Response:
        """Make one webhook URL path (`T…/B…/secret`) answer 404 no_service from now on."""
        spec = control_json()
        hook = str(spec.get("hook", "")).split("/services/")[-1]
        if not PATH_RE.match(hook):
            raise ValueError("'hook' must be a webhook URL or its T…/B…/secret path")
        with lock:
            revoked.add(hook)
        return jsonify({"ok": True})

    def reset_all() -> None:
        messages.clear()
        with lock:
            revoked.clear()

    add_control_routes(app, "slack", faults=faults, reset=reset_all)

    @app.errorhandler(404)
    def not_found(_: Exception) -> Response:
        return _plain("no_service", 404)

    @app.errorhandler(405)
    def not_allowed(_: Exception) -> Response:
        return _plain("invalid_request", 405)

    return app, messages
