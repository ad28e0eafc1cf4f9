"""Anthropic Messages API emulator: `/v1/messages`, `/v1/messages/count_tokens`, `/v1/models`.

Speaks the real wire protocol (auth by `x-api-key`, `anthropic-version` required, errors as
`{"type":"error","error":{"type","message"},"request_id"}` with a `request-id` header), follows the
prompt-caching rules (≤ 4 breakpoints, prefix order tools → system → messages, per-model minimum
cacheable length, 5 min / 1 h TTL refreshed on every hit, 20-block lookback, cache keyed by API key +
model + exact prefix) and counts tokens with the documented counter in `anthropic_tokens`.

Control API (not part of Anthropic's): `POST /_emulator/anthropic/script`, `GET|DELETE` the same,
`POST /_emulator/anthropic/clock {"advance_seconds"}`, `GET /_emulator/anthropic/requests`,
`GET /_emulator/anthropic/info`, `GET /_emulator/anthropic/cache`, `POST /_emulator/reset`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from flask import Flask, Response, jsonify, request, stream_with_context

from emulators import anthropic_tokens as tok
from emulators.anthropic_models import MODELS, lookup
from emulators.anthropic_schema import generate
from emulators.common import Recorder, add_control_error_handler, control_json, random_id, safe_headers

DEFAULT_REPLY = "This is a deterministic reply from the Anthropic emulator."
MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20
TTL_SECONDS = {"5m": 300, "1h": 3600}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               504: "timeout_error", 529: "overloaded_error"}
ERROR_MESSAGES = {429: "Number of request tokens has exceeded your per-minute rate limit", 500: "Internal server error",
                  529: "Overloaded", 504: "Request timed out"}
BLOCK_TYPES = {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
               "search_result", "server_tool_use", "web_search_tool_result"}
CACHEABLE_BLOCKS = {"text", "image", "document", "tool_use", "tool_result", "search_result"}


class ApiError(Exception):
    """An error answered in Anthropic's shape."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or ERROR_TYPES.get(status, "api_error")


@dataclass
class Step:
    """One scripted behaviour for the next matching /v1/messages call."""

    spec: dict[str, Any]
    times: int = 1


@dataclass
class AnthropicState:
    """All mutable state of the emulator, behind one lock."""

    keys: tuple[str, ...]
    lock: threading.Lock = field(default_factory=threading.Lock)
    clock_offset: float = 0.0
    cache: dict[bytes, tuple[float, int]] = field(default_factory=dict)
    script: list[Step] = field(default_factory=list)
    recorder: Recorder = field(default_factory=Recorder)
    calls: int = 0

    def now(self) -> float:
        return time.time() + self.clock_offset

    def reset(self) -> None:
        with self.lock:
            self.clock_offset = 0.0
            self.cache.clear()
            self.script.clear()
            self.calls = 0
        self.recorder.clear()


# ---------------------------------------------------------------- validation

def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ApiError(400, message)


def _validate_cache_control(cc: Any, where: str) -> None:
    _require(isinstance(cc, dict), f"{where}.cache_control: Input should be a valid dictionary")
    _require(cc.get("type") == "ephemeral", f"{where}.cache_control.type: Input should be 'ephemeral'")
    ttl = cc.get("ttl", "5m")
    _require(ttl in TTL_SECONDS, f"{where}.cache_control.ttl: Input should be '5m' or '1h'")


def _validate_block(block: Any, where: str, allow_tool_result: bool = True) -> None:
    _require(isinstance(block, dict), f"{where}: Input should be a valid dictionary")
    kind = block.get("type")
    _require(isinstance(kind, str), f"{where}.type: Field required")
    _require(kind in BLOCK_TYPES, f"{where}.type: Input tag '{kind}' found using 'type' does not match any of the expected tags")
    if kind == "text":
        _require(isinstance(block.get("text"), str), f"{where}.text: Field required")
        _require(block["text"] != "", f"{where}: text content blocks must be non-empty")
    elif kind == "tool_use":
        _require(isinstance(block.get("id"), str), f"{where}.id: Field required")
        _require(isinstance(block.get("name"), str), f"{where}.name: Field required")
        _require(isinstance(block.get("input"), dict), f"{where}.input: Input should be a valid dictionary")
    elif kind == "tool_result":
        _require(allow_tool_result, f"{where}: tool_result blocks are only allowed in user messages")
        _require(isinstance(block.get("tool_use_id"), str), f"{where}.tool_use_id: Field required")
        content = block.get("content")
        if isinstance(content, list):
            for i, inner in enumerate(content):
                _validate_block(inner, f"{where}.content.{i}")
        else:
            _require(content is None or isinstance(content, str), f"{where}.content: Input should be a valid string or list")
    elif kind in ("image", "document"):
        _require(isinstance(block.get("source"), dict), f"{where}.source: Field required")
    if "cache_control" in block and block["cache_control"] is not None:
        _require(kind in CACHEABLE_BLOCKS, f"{where}: cache_control cannot be set on {kind} blocks")
        _validate_cache_control(block["cache_control"], where)


def _validate_tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is None:
        return
    _require(isinstance(tools, list), "tools: Input should be a valid list")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        _require(isinstance(tool, dict), f"{where}: Input should be a valid dictionary")
        name = tool.get("name")
        _require(isinstance(name, str), f"{where}.custom.name: Field required")
        _require(1 <= len(name) <= 128 and all(c.isalnum() or c in "_-" for c in name) and name.isascii(),
                 f"{where}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        _require(name not in names, f"tools: Tool names must be unique. Duplicate name: {name}")
        names.add(name)
        if tool.get("type") in (None, "custom"):
            schema = tool.get("input_schema")
            _require(isinstance(schema, dict), f"{where}.custom.input_schema: Field required")
            _require(schema.get("type") == "object", f"{where}.custom.input_schema.type: Input should be 'object'")
        if tool.get("cache_control") is not None:
            _validate_cache_control(tool["cache_control"], where)
    choice = body.get("tool_choice")
    if choice is not None:
        _require(isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none"),
                 "tool_choice: Input tag found using 'type' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'")
        if choice["type"] == "tool":
            _require(isinstance(choice.get("name"), str), "tool_choice.tool.name: Field required")
            _require(choice["name"] in names, f"tool_choice: Tool '{choice['name']}' not found in tools")
        if choice["type"] in ("any", "tool"):
            _require(bool(tools), "tool_choice: tool_choice may only be specified while providing tools")


@dataclass
class Prepared:
    """A validated request split into prefix segments (computed once per request)."""

    body: dict[str, Any]
    preamble: int
    segments: list[tok.Segment]
    points: list[tuple[int, str]]  # (segment index, ttl) of every cache breakpoint, in prefix order

    @property
    def total(self) -> int:
        return self.preamble + sum(s.tokens for s in self.segments)


def validate(body: Any, *, needs_max_tokens: bool) -> Prepared:
    """Check a request the way the API does; return it prepared or raise ApiError(400/404)."""
    _require(isinstance(body, dict), "There was an issue with your request body: expected a JSON object")
    model = body.get("model")
    _require(isinstance(model, str) and model != "", "model: Field required")
    info = lookup(model)
    if info is None:
        raise ApiError(404, f"model: {model}")
    if needs_max_tokens:
        mt = body.get("max_tokens")
        _require(mt is not None, "max_tokens: Field required")
        _require(isinstance(mt, int) and not isinstance(mt, bool), "max_tokens: Input should be a valid integer")
        _require(mt >= 1, "max_tokens: Input should be greater than or equal to 1")
        _require(mt <= info.max_output_tokens,
                 f"max_tokens: {mt} > {info.max_output_tokens}, which is the maximum allowed number of output tokens for {model}")
    messages = body.get("messages")
    _require(messages is not None, "messages: Field required")
    _require(isinstance(messages, list), "messages: Input should be a valid list")
    _require(len(messages) > 0, "messages: at least one message is required")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        _require(isinstance(message, dict), f"{where}: Input should be a valid dictionary")
        role = message.get("role")
        if role == "system":
            raise ApiError(400, f'{where}.role: Unexpected role "system". The Messages API accepts a top-level `system` parameter, not "system" as an input message role.')
        _require(role in ("user", "assistant"), f"{where}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        _require(content is not None, f"{where}.content: Field required")
        if isinstance(content, str):
            continue
        _require(isinstance(content, list), f"{where}.content: Input should be a valid list")
        for j, block in enumerate(content):
            _validate_block(block, f"{where}.content.{j}", allow_tool_result=(role == "user"))
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        _require(isinstance(system, list), "system: Input should be a valid string or list")
        for j, block in enumerate(system):
            _validate_block(block, f"system.{j}")
            _require(block.get("type") == "text", f"system.{j}.type: Input should be 'text'")
    _validate_tools(body)
    if body.get("cache_control") is not None:
        _validate_cache_control(body["cache_control"], "")
    temperature = body.get("temperature")
    if temperature is not None:
        _require(isinstance(temperature, (int, float)) and 0 <= temperature <= 1,
                 "temperature: Input should be less than or equal to 1")
    stops = body.get("stop_sequences")
    if stops is not None:
        _require(isinstance(stops, list) and all(isinstance(s, str) for s in stops),
                 "stop_sequences: Input should be a valid list of strings")
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled" and needs_max_tokens:
        budget = thinking.get("budget_tokens")
        _require(isinstance(budget, int) and budget >= 1024, "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        _require(budget < body["max_tokens"], "`max_tokens` must be greater than `thinking.budget_tokens`")
    preamble, segs = tok.segments(body)
    prepared = Prepared(dict(body), preamble, segs, _breakpoints(body, segs))
    _validate_breakpoints(prepared.points)
    total = prepared.total
    _require(total <= info.context_window, f"prompt is too long: {total} tokens > {info.context_window} maximum")
    return prepared


def _breakpoints(body: dict[str, Any], segs: list[tok.Segment]) -> list[tuple[int, str]]:
    """[(segment index, ttl)] of explicit breakpoints plus the automatic (top-level cache_control) one."""
    points = [(i, str(s.cache_control.get("ttl", "5m"))) for i, s in enumerate(segs) if s.cache_control]
    auto = body.get("cache_control")
    if auto and segs:
        last = len(segs) - 1
        if all(p != last for p, _ in points):
            points.append((last, str(auto.get("ttl", "5m"))))
    return sorted(points)


def _validate_breakpoints(points: list[tuple[int, str]]) -> None:
    if len(points) > MAX_BREAKPOINTS:
        raise ApiError(400, f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(points)}.")
    seen_5m = False
    for _, ttl in points:
        if ttl == "5m":
            seen_5m = True
        elif seen_5m:
            raise ApiError(400, "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
                                "Note that blocks are processed in the following order: `tools`, `system`, `messages`.")


# ---------------------------------------------------------------- caching

@dataclass
class CacheUsage:
    """How one request's input splits into uncached, written and read tokens."""

    input_tokens: int
    cache_read: int
    creation_5m: int
    creation_1h: int


def apply_cache(state: AnthropicState, api_key: str, prepared: Prepared) -> CacheUsage:
    """Look up the longest cached prefix, write the breakpoints after it, refresh what was hit."""
    body = prepared.body
    info = lookup(body["model"])
    assert info is not None
    preamble, segs, points = prepared.preamble, prepared.segments, prepared.points
    total = prepared.total
    if not points:
        return CacheUsage(total, 0, 0, 0)
    cum: list[int] = []
    running = preamble
    for s in segs:
        running += s.tokens
        cum.append(running)
    seed = hashlib.sha256(api_key.encode()).digest() + body["model"].encode() + (b"T" if body.get("tools") else b"-")
    hashes = tok.prefix_hashes(seed, segs)
    now = state.now()
    with state.lock:
        hit = -1
        for bp, _ in points:
            for pos in range(bp, max(-1, bp - LOOKBACK_BLOCKS), -1):
                entry = state.cache.get(hashes[pos])
                if entry is not None and entry[0] > now and pos > hit:
                    hit = pos
                    break
        if hit >= 0:
            _, ttl_s = state.cache[hashes[hit]]
            state.cache[hashes[hit]] = (now + ttl_s, ttl_s)
        prev = cum[hit] if hit >= 0 else 0
        read = prev
        c5 = c1 = 0
        for bp, ttl in points:
            ttl_s = TTL_SECONDS[ttl]
            entry = state.cache.get(hashes[bp])
            if bp <= hit:
                if entry is not None and entry[0] > now:  # earlier breakpoints are hit too: refresh them
                    state.cache[hashes[bp]] = (now + max(ttl_s, entry[1]), max(ttl_s, entry[1]))
                continue
            if cum[bp] < info.min_cacheable_tokens:
                continue  # below the model's minimum: silently not cached, as upstream
            span = cum[bp] - prev
            if ttl == "1h":
                c1 += span
            else:
                c5 += span
            state.cache[hashes[bp]] = (now + ttl_s, ttl_s)
            prev = cum[bp]
        if len(state.cache) > 200_000:
            for k in [k for k, (exp, _) in state.cache.items() if exp <= now]:
                del state.cache[k]
    return CacheUsage(total - read - c5 - c1, read, c5, c1)


# ---------------------------------------------------------------- replies

def _take_step(state: AnthropicState, raw: str) -> dict[str, Any] | None:
    with state.lock:
        for step in state.script:
            match = step.spec.get("match")
            if match is None or str(match) in raw:
                step.times -= 1
                if step.times <= 0:
                    state.script.remove(step)
                return step.spec
    return None


def _forced_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {}
    if not tools or choice.get("type") not in ("any", "tool"):
        return None
    if choice["type"] == "tool":
        return dict(next(t for t in tools if t.get("name") == choice["name"]))
    return dict(next((t for t in tools if t.get("type") in (None, "custom")), tools[0]))


def _reply_content(body: dict[str, Any], step: dict[str, Any] | None) -> list[dict[str, Any]]:
    step = step or {}
    if isinstance(step.get("content"), list):
        return [dict(b) for b in step["content"]]
    tools = {t.get("name"): t for t in body.get("tools") or []}
    if "tool_input" in step or "tool_name" in step:
        name = step.get("tool_name")
        forced = _forced_tool(body)
        tool = tools.get(name) if name else forced or next(iter(tools.values()), None)
        tool_name = name or (tool or {}).get("name") or "tool"
        tool_input = step.get("tool_input")
        if tool_input is None or tool_input == "auto":
            tool_input = generate((tool or {}).get("input_schema", {"type": "object"}))
        return [{"type": "tool_use", "id": random_id("toolu_"), "name": tool_name, "input": tool_input}]
    if "text" in step:
        return [{"type": "text", "text": str(step["text"])}]
    forced = _forced_tool(body)
    if forced is not None:
        return [{"type": "tool_use", "id": random_id("toolu_"), "name": forced["name"],
                 "input": generate(forced.get("input_schema", {"type": "object"}))}]
    return [{"type": "text", "text": DEFAULT_REPLY}]


def _output_tokens(content: list[dict[str, Any]]) -> int:
    return max(1, sum(tok.block_tokens(b) for b in content))


def _finish(body: dict[str, Any], content: list[dict[str, Any]], step: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str, str | None, int]:
    """Apply stop sequences and max_tokens: (content, stop_reason, stop_sequence, output_tokens)."""
    step = step or {}
    max_tokens = int(body["max_tokens"])
    stop_reason = "tool_use" if any(b.get("type") == "tool_use" for b in content) else "end_turn"
    stop_seq = None
    for b in content:
        if b.get("type") == "text":
            for s in body.get("stop_sequences") or []:
                idx = b["text"].find(s) if s else -1
                if idx >= 0:
                    b["text"] = b["text"][:idx]
                    stop_reason, stop_seq = "stop_sequence", s
                    break
    out = int(step["output_tokens"]) if "output_tokens" in step else _output_tokens(content)
    if out > max_tokens:
        out = max_tokens
        stop_reason, stop_seq = "max_tokens", None
        budget = max_tokens * tok.CHARS_PER_TOKEN
        trimmed: list[dict[str, Any]] = []
        for b in content:
            if b.get("type") == "text":
                b["text"] = b["text"][:budget]
                budget -= len(b["text"])
                trimmed.append(b)
            elif b.get("type") == "tool_use":
                trimmed.append({**b, "input": {}})  # cut off mid-generation: incomplete input
                break
            if budget <= 0:
                break
        content = trimmed
    if "stop_reason" in step:
        stop_reason = str(step["stop_reason"])
    return content, stop_reason, stop_seq, out


# ---------------------------------------------------------------- the app

def create_app(keys: tuple[str, ...]) -> tuple[Flask, AnthropicState]:
    """The Flask app of the Anthropic emulator, accepting the given API keys."""
    app = Flask("emulators.anthropic")
    state = AnthropicState(keys=keys)
    add_control_error_handler(app)

    def error(exc: ApiError, request_id: str, extra_headers: dict[str, str] | None = None) -> Response:
        resp = jsonify({"type": "error", "error": {"type": exc.error_type, "message": exc.message}, "request_id": request_id})
        resp.status_code = exc.status
        resp.headers["request-id"] = request_id
        for k, v in (extra_headers or {}).items():
            resp.headers[k] = v
        return resp

    def authenticate() -> str:
        key = request.headers.get("x-api-key")
        if key is None:
            auth = request.headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else None
        if not key:
            raise ApiError(401, "x-api-key header is required")
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in state.keys):
            raise ApiError(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            raise ApiError(400, "anthropic-version: header is required")
        return key

    def record(status: int, body: Any, summary: dict[str, Any] | None = None) -> None:
        state.recorder.add({"method": request.method, "path": request.path, "headers": safe_headers(request),
                            "body": body, "status": status, "response": summary or {}})

    def parse_body() -> Any:
        try:
            return json.loads(request.get_data(cache=True) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "There was an issue with your request body: invalid JSON") from None

    @app.post("/v1/messages/count_tokens")
    def count_tokens() -> Response:
        request_id = random_id("req_")
        body: Any = None
        try:
            authenticate()
            body = parse_body()
            count = validate(body, needs_max_tokens=False).total
        except ApiError as exc:
            record(exc.status, body, {"error": exc.error_type})
            return error(exc, request_id)
        record(200, body, {"input_tokens": count})
        resp = jsonify({"input_tokens": count})
        resp.headers["request-id"] = request_id
        return resp

    @app.post("/v1/messages")
    def messages() -> Response:
        request_id = random_id("req_")
        body: Any = None
        try:
            key = authenticate()
            raw = request.get_data(cache=True).decode("utf-8", "replace")
            body = parse_body()
            prepared = validate(body, needs_max_tokens=True)
        except ApiError as exc:
            record(exc.status, body, {"error": exc.error_type})
            return error(exc, request_id)
        with state.lock:
            state.calls += 1
        step = _take_step(state, raw)
        if step and step.get("delay_seconds"):
            time.sleep(float(step["delay_seconds"]))
        if step and step.get("status"):
            status = int(step["status"])
            headers: dict[str, str] = {}
            if step.get("retry_after") is not None:
                headers["retry-after"] = str(step["retry_after"])
            if step.get("retry_after_ms") is not None:
                headers["retry-after-ms"] = str(step["retry_after_ms"])
            if step.get("should_retry") is not None:
                headers["x-should-retry"] = "true" if step["should_retry"] else "false"
            fault = ApiError(status, str(step.get("message") or ERROR_MESSAGES.get(status, "Scripted error")),
                             step.get("error_type"))
            record(status, body, {"error": fault.error_type, "scripted": True})
            return error(fault, request_id, headers)
        cache = apply_cache(state, key, prepared)
        content, stop_reason, stop_seq, out_tokens = _finish(body, _reply_content(body, step), step)
        usage: dict[str, Any] = {
            "input_tokens": cache.input_tokens,
            "cache_creation_input_tokens": cache.creation_5m + cache.creation_1h,
            "cache_read_input_tokens": cache.cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": cache.creation_5m,
                               "ephemeral_1h_input_tokens": cache.creation_1h},
            "output_tokens": out_tokens,
            "service_tier": "standard",
        }
        if step and isinstance(step.get("usage"), dict):
            usage.update(step["usage"])
        message = {"id": random_id("msg_"), "type": "message", "role": "assistant", "model": body["model"],
                   "content": content, "stop_reason": stop_reason, "stop_sequence": stop_seq, "usage": usage}
        record(200, body, {"id": message["id"], "usage": usage, "stop_reason": stop_reason,
                           "scripted": step is not None})
        if body.get("stream"):
            resp = Response(stream_with_context(_sse(message)), mimetype="text/event-stream")
        else:
            resp = jsonify(message)
        resp.headers["request-id"] = request_id
        return resp

    @app.get("/v1/models")
    def list_models() -> Response:
        data = [{"type": "model", "id": m.id, "display_name": m.display_name, "created_at": "2025-01-01T00:00:00Z",
                 "lifecycle": "active", "max_input_tokens": m.context_window, "max_tokens": m.max_output_tokens}
                for m in MODELS.values()]
        return jsonify({"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})

    @app.get("/v1/models/<model_id>")
    def get_model(model_id: str) -> Response:
        m = lookup(model_id)
        if m is None:
            return error(ApiError(404, f"model: {model_id}"), random_id("req_"))
        return jsonify({"type": "model", "id": m.id, "display_name": m.display_name, "created_at": "2025-01-01T00:00:00Z",
                        "lifecycle": "active", "max_input_tokens": m.context_window, "max_tokens": m.max_output_tokens})

    # ------------------------------------------------------------ control

    @app.post("/_emulator/anthropic/script")
    def add_script() -> Response:
        spec = control_json()
        steps = spec.get("steps")
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise ValueError("'steps' must be a list of objects")
        for s in steps:
            if "status" in s and not 400 <= int(s["status"]) <= 599:
                raise ValueError("a fault step's 'status' must be 4xx or 5xx")
        with state.lock:
            if spec.get("replace"):
                state.script.clear()
            state.script.extend(Step(dict(s), int(s.get("times", 1))) for s in steps)
            remaining = len(state.script)
        return jsonify({"queued": len(steps), "remaining": remaining})

    @app.get("/_emulator/anthropic/script")
    def get_script() -> Response:
        with state.lock:
            return jsonify({"steps": [{**s.spec, "times": s.times} for s in state.script]})

    @app.delete("/_emulator/anthropic/script")
    def clear_script() -> Response:
        with state.lock:
            state.script.clear()
        return jsonify({"ok": True})

    @app.post("/_emulator/anthropic/clock")
    def advance_clock() -> Response:
        spec = control_json()
        seconds = spec.get("advance_seconds")
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError("'advance_seconds' must be a non-negative number")
        with state.lock:
            state.clock_offset += float(seconds)
        return jsonify({"now": state.now(), "offset_seconds": state.clock_offset})

    @app.get("/_emulator/anthropic/clock")
    def get_clock() -> Response:
        return jsonify({"now": state.now(), "offset_seconds": state.clock_offset})

    @app.get("/_emulator/anthropic/requests")
    def get_requests() -> Response:
        items = state.recorder.all()
        path = request.args.get("path")
        if path:
            items = [i for i in items if i["path"] == path]
        return jsonify({"requests": items, "calls": state.calls})

    @app.get("/_emulator/anthropic/cache")
    def get_cache() -> Response:
        now = state.now()
        with state.lock:
            live = [exp - now for exp, _ in state.cache.values() if exp > now]
        return jsonify({"entries": len(live), "seconds_left": sorted(live)})

    @app.get("/_emulator/anthropic/info")
    def get_info() -> Response:
        return jsonify({
            "chars_per_token": tok.CHARS_PER_TOKEN,
            "request_overhead_tokens": tok.REQUEST_OVERHEAD_TOKENS,
            "message_overhead_tokens": tok.MESSAGE_OVERHEAD_TOKENS,
            "tool_use_system_prompt_tokens": tok.TOOL_USE_SYSTEM_PROMPT_TOKENS,
            "max_fixed_overhead_tokens": tok.MAX_FIXED_OVERHEAD_TOKENS,
            "bound": "input_tokens <= utf8 bytes of the request body + tool_use_system_prompt_tokens[tool_choice] (if tools)",
            "max_breakpoints": MAX_BREAKPOINTS, "lookback_blocks": LOOKBACK_BLOCKS, "ttl_seconds": TTL_SECONDS,
            "models": {m.id: {"min_cacheable_tokens": m.min_cacheable_tokens, "max_output_tokens": m.max_output_tokens,
                              "context_window": m.context_window} for m in MODELS.values()},
        })

    @app.post("/_emulator/reset")
    def reset() -> Response:
        state.reset()
        return jsonify({"ok": True})

    @app.get("/_emulator/health")
    def health() -> Response:
        return jsonify({"ok": True, "emulator": "anthropic"})

    @app.errorhandler(404)
    def not_found(_: Exception) -> Response:
        return error(ApiError(404, "Not found"), random_id("req_"))

    @app.errorhandler(405)
    def not_allowed(_: Exception) -> Response:
        return error(ApiError(405, "Method not allowed", "invalid_request_error"), random_id("req_"))

    return app, state


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _sse(message: dict[str, Any]) -> Iterator[str]:
    """The server-sent events of a streamed message, built from the finished message."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": min(1, usage["output_tokens"])}}
    yield _event("message_start", {"type": "message_start", "message": start})
    yield _event("ping", {"type": "ping"})
    for i, block in enumerate(message["content"]):
        if block["type"] == "text":
            yield _event("content_block_start", {"type": "content_block_start", "index": i,
                                                 "content_block": {"type": "text", "text": ""}})
            text = block["text"]
            for pos in range(0, len(text), 24):
                yield _event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                     "delta": {"type": "text_delta", "text": text[pos:pos + 24]}})
        elif block["type"] == "tool_use":
            yield _event("content_block_start", {"type": "content_block_start", "index": i,
                                                 "content_block": {**block, "input": {}}})
            partial = json.dumps(block["input"])
            for pos in range(0, len(partial), 24):
                yield _event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                     "delta": {"type": "input_json_delta", "partial_json": partial[pos:pos + 24]}})
        else:
            yield _event("content_block_start", {"type": "content_block_start", "index": i, "content_block": block})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": i})
    yield _event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
                                   "usage": {"output_tokens": usage["output_tokens"],
                                             "input_tokens": usage["input_tokens"],
                                             "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                                             "cache_read_input_tokens": usage["cache_read_input_tokens"]}})
    yield _event("message_stop", {"type": "message_stop"})
