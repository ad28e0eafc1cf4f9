"""The Anthropic-compatible LLM gateway: policy check, worst-case reservation, forward, settle from usage."""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Iterator, Mapping
from zoneinfo import ZoneInfo

import psycopg
import psycopg_pool
import urllib3
from psycopg_pool import ConnectionPool

from . import metrics as m
from . import repository as repo
from .policy import Policy, Price, micros_to_usd
from .service import PolicyStore, kill_switch_state, period_caps

log = logging.getLogger(__name__)

RUN_HEADER = "X-Metis-Run-Id"
JUSTIFICATION_HEADER = "X-Metis-Justification"
DENIAL_HEADER = "X-Metis-Denial"
# Request headers passed on to the upstream (besides content-type and our key); everything else (the caller's
# token, the run id, hop-by-hop headers) stays here.
_FORWARD_HEADERS = ("anthropic-version", "anthropic-beta")
# Response headers worth passing back (rate-limit hints drive the SDK's own backoff on 429/529).
_RETURN_HEADER_PREFIXES = ("anthropic-", "retry-after", "request-id", "x-should-retry", "content-type")
_UNBOUNDED_SOURCES = ("url", "file")


@dataclass
class GatewayResponse:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterator[bytes] | None = None  # a streamed (SSE) body, settled when it ends


def anthropic_error(status: int, etype: str, message: str, *, reason: str | None = None,
                    details: Mapping[str, Any] | None = None, retry: bool | None = None) -> GatewayResponse:
    """An error in Anthropic's shape; `reason` lands in error.details.error_code (what the SDK reads)."""
    err: dict[str, Any] = {"type": etype, "message": message}
    if reason:
        err["details"] = {"error_code": reason, **(details or {})}
    body = {"type": "error", "error": err, "request_id": f"metis_{uuid.uuid4().hex[:24]}"}
    headers = {"content-type": "application/json"}
    if reason:
        headers[DENIAL_HEADER] = reason
    if retry is not None:
        # The SDK obeys this before its status rules: denials are never retried.
        headers["x-should-retry"] = "true" if retry else "false"
    return GatewayResponse(status, json.dumps(body).encode(), headers)


def deny(reason: str, message: str, *, status: int = 403, **details: Any) -> GatewayResponse:
    m.child(m.DENIALS, reason).inc()
    etype = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error"}[status]
    return anthropic_error(status, etype, message, reason=reason, details=details, retry=False)


def invalid(message: str) -> GatewayResponse:
    """The 400 Anthropic itself would give for a malformed request (checked before any money is reserved)."""
    m.child(m.DENIALS, "invalid_request").inc()
    return anthropic_error(400, "invalid_request_error", message, retry=False)


def request_problem(req: Mapping[str, Any]) -> str | None:
    """The first shape error Anthropic would report with a 400, checked before anything is reserved
    (the upstream still validates everything else; its 400 then releases the reservation)."""
    messages = req.get("messages")
    if messages is None:
        return "messages: Field required"
    if not isinstance(messages, list):
        return "messages: Input should be a valid list"
    if not messages:
        return "messages: at least one message is required"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"messages.{i}: Input should be a valid dictionary"
        if msg.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        content = msg.get("content")
        if content is None:
            return f"messages.{i}.content: Field required"
        if not isinstance(content, (str, list)):
            return f"messages.{i}.content: Input should be a valid string or list"
        if isinstance(content, list) and not all(isinstance(b, dict) and isinstance(b.get("type"), str)
                                                 for b in content):
            return f"messages.{i}.content: every content block needs a type"
    system = req.get("system")
    if system is not None and not isinstance(system, (str, list)):
        return "system: Input should be a valid string or list"
    for name, hi in (("temperature", 1.0), ("top_p", 1.0)):
        v = req.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi):
            return f"{name}: Input should be a number between 0 and {hi:g}"
    tools = req.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                return f"tools.{i}.name: Field required"
    return None


def input_bound(policy: Policy, raw: bytes, req: Mapping[str, Any]) -> int | str:
    """Upper bound on billed input tokens: one token covers at least one byte of the UTF-8 request, plus the
    fixed overheads the body does not show. Returns a message instead when the input cannot be bounded."""
    bound = len(raw) + policy.request_overhead_tokens
    tools = req.get("tools") or []
    if tools:
        for tool in tools:
            ttype = tool.get("type") if isinstance(tool, dict) else None
            if ttype not in (None, "custom"):
                # Server tools (web search, code execution...) add input the request does not contain.
                return f"server tool {ttype!r} makes the input unbounded; only custom tools are allowed"
        bound += policy.tool_use_overhead_tokens
    if req.get("mcp_servers"):
        return "mcp_servers make the input unbounded"
    for msg in req.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict):
                continue
            btype, source = block.get("type"), block.get("source")
            stype = source.get("type") if isinstance(source, dict) else None
            if btype == "image" and stype in _UNBOUNDED_SOURCES:
                bound += policy.image_tokens
            elif btype == "document" and stype in _UNBOUNDED_SOURCES:
                return "documents given by URL or file id make the input unbounded; send them inline"
    return bound


def worst_case_micros(price: Price, input_tokens: int, max_tokens: int) -> int:
    """Every input token at the dearest input rate (uncached or either cache write), all output tokens used."""
    nanos = input_tokens * price.max_input + max_tokens * price.output
    return -(-nanos // 1000)


@dataclass(frozen=True)
class Usage:
    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int

    @property
    def total(self) -> int:
        return self.input + self.output + self.cache_write_5m + self.cache_write_1h + self.cache_read


def parse_usage(usage: Any, raw_request: bytes) -> Usage:
    """Anthropic usage -> tokens per kind. Without the 5m/1h split, writes count as 1h if the request asked for 1h."""
    if not isinstance(usage, dict):
        raise ValueError("response has no usage")

    def n(v: Any) -> int:
        if v is None:
            return 0
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"bad token count {v!r}")
        return v

    created = n(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    if isinstance(split, dict):
        w5, w1 = n(split.get("ephemeral_5m_input_tokens")), n(split.get("ephemeral_1h_input_tokens"))
        w1 += max(0, created - w5 - w1)  # any unexplained remainder at the dearer rate
    elif b'"1h"' in raw_request:
        w5, w1 = 0, created
    else:
        w5, w1 = created, 0
    return Usage(n(usage.get("input_tokens")), n(usage.get("output_tokens")), w5, w1,
                 n(usage.get("cache_read_input_tokens")))


def cost_nanos(price: Price, u: Usage) -> dict[str, int]:
    return {"input": u.input * price.input, "output": u.output * price.output,
            "cache_write_5m": u.cache_write_5m * price.cache_write_5m,
            "cache_write_1h": u.cache_write_1h * price.cache_write_1h,
            "cache_read": u.cache_read * price.cache_read}


def _usd(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    return f"{sign}{micros // 1_000_000}.{micros % 1_000_000:06d}"


class Gateway:
    """One instance per worker; thread-safe (the run cache holds only immutable facts: task and trigger)."""

    def __init__(self, *, pool: ConnectionPool, policies: PolicyStore, upstream_url: str, api_key: str,
                 timeout: float = 600.0, http: urllib3.HTTPConnectionPool | None = None,
                 durable: bool = True) -> None:
        self._pool = pool
        self._policies = policies
        self._upstream = upstream_url.rstrip("/")
        self._key = api_key
        self._timeout = urllib3.Timeout(connect=5.0, read=timeout)
        # One keep-alive pool for the one upstream host (cheaper per call than a PoolManager's URL routing).
        self._http = http or urllib3.connection_from_url(self._upstream, maxsize=64, block=False, retries=False)
        self._base_path = urllib3.util.parse_url(self._upstream).path or ""
        self._runs: dict[str, tuple[str, str]] = {}
        self._durable = durable
        # The period caps a task's call falls under, as the JSON `reserve` takes: the same for every call of a
        # task on one local day under one policy version, so built once per (policy digest, task, local day).
        self._caps_json: dict[tuple[str, str, date], str] = {}
        self._fwd_base = {"anthropic-version": "2023-06-01", "content-type": "application/json",
                          "x-api-key": api_key}

    # -------------------------------------------------------------- messages

    def messages(self, raw: bytes, headers: Mapping[str, str], caller: str) -> GatewayResponse:
        """POST /v1/messages through the guardrails."""
        try:
            return self._messages(raw, headers, caller)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg.errors.AdminShutdown) as exc:
            # Fail closed: no ledger, no call. 503 lets the SDK back off and retry a brief outage.
            log.warning("ledger unavailable; refusing LLM call", extra={"error": str(exc)[:200]})
            m.child(m.DENIALS, "ledger_unavailable").inc()
            return anthropic_error(503, "api_error", "the guardrails ledger is unavailable; the call was refused "
                                   "(fail closed)", reason="ledger_unavailable")

    def _messages(self, raw: bytes, headers: Mapping[str, str], caller: str) -> GatewayResponse:
        t0 = time.perf_counter()
        try:
            req = json.loads(raw)
        except ValueError:
            return invalid("request body is not valid JSON")
        if not isinstance(req, dict):
            return invalid("request body must be a JSON object")
        model, max_tokens = req.get("model"), req.get("max_tokens")
        if not isinstance(model, str) or not model:
            return invalid("model: Field required")
        if max_tokens is None:
            return invalid("max_tokens: Field required")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            return invalid("max_tokens: Input should be a valid integer greater than or equal to 1")
        problem = request_problem(req)
        if problem:
            return invalid(problem)

        run_id = _header(headers, RUN_HEADER)
        if not run_id:
            return invalid(f"{RUN_HEADER}: header required (open a run first: POST /v1/runs)")
        try:
            run_uuid = uuid.UUID(run_id)
        except ValueError:
            return invalid(f"{RUN_HEADER}: must be a UUID")
        policy = self._policies.get()
        facts = self._run_facts(str(run_uuid))
        if facts is None:
            return deny("unknown_run", f"no run {run_uuid}", status=404)
        task, trigger = facts
        justification = (_header(headers, JUSTIFICATION_HEADER) or "").strip()

        denial = self._check_model(policy, task, trigger, model, justification)
        if denial is not None:
            with self._pool.connection() as conn:
                repo.audit_append(conn, kind="llm.denied", actor=caller, run_id=run_uuid, task=task, subject=model,
                                  data={"reason": denial[0], "message": denial[1]})
            return deny(denial[0], denial[1], model=model, task=task)
        priced = policy.resolve_model(model)
        assert priced is not None
        price = policy.prices[priced]
        bound = input_bound(policy, raw, req)
        if isinstance(bound, str):
            return deny("unbounded_input", bound)
        reserve_micros = worst_case_micros(price, bound, max_tokens)
        reserve_tokens = bound + max_tokens
        reservation_id = uuid.uuid4()
        with self._pool.connection() as conn:
            r = repo.reserve(conn, reservation_id=reservation_id, run_id=run_uuid, caller=caller, model=priced,
                             amount_micros=reserve_micros, tokens=reserve_tokens, caps=self._caps(policy, task),
                             timeout_seconds=policy.reservation_timeout_seconds,
                             audit={"trigger": trigger, "max_tokens": max_tokens, "input_bound": bound})
            if r["ok"] and self._durable:
                # The reservation must be on disk before money can be spent; flushed here, outside the cap locks.
                repo.make_durable(conn, reservation_id)
        if not r["ok"]:
            reason = r["reason"]
            if reason == "unknown_run":
                return deny(reason, r["message"], status=404)
            return deny(reason, r["message"], cap=r.get("cap"), remaining_micros=r.get("remaining"),
                        reserve_micros=reserve_micros)
        m.OPEN_RESERVATIONS.inc()
        try:
            out = self._forward_and_settle(raw, headers, req, policy, price, priced, task, caller, reservation_id,
                                           reserve_micros, reserve_tokens, justification, t0)
        except BaseException:
            m.OPEN_RESERVATIONS.dec()
            raise
        if out.stream is None:
            m.OPEN_RESERVATIONS.dec()
        else:
            out.stream = _then(out.stream, m.OPEN_RESERVATIONS.dec)
        return out

    def _forward_and_settle(self, raw: bytes, headers: Mapping[str, str], req: Mapping[str, Any], policy: Policy,
                            price: Price, model: str, task: str, caller: str, reservation_id: uuid.UUID,
                            reserve_micros: int, reserve_tokens: int, justification: str,
                            t0: float) -> GatewayResponse:
        fwd = self._forward_headers(headers)
        sent = False
        streaming = bool(req.get("stream"))
        try:
            t_up = time.perf_counter()
            resp = self._http.urlopen("POST", self._base_path + "/v1/messages", body=raw, headers=fwd,
                                      timeout=self._timeout, preload_content=not streaming, redirect=False)
            sent = True
            upstream_seconds = time.perf_counter() - t_up
        except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError) as exc:
            # The request never left: nothing can have been spent.
            self._settle(reservation_id, "released", 0, 0, policy, "llm.upstream_error",
                         {"error": f"{type(exc).__name__}", "sent": False})
            return anthropic_error(502, "api_error", "the Anthropic API could not be reached")
        except urllib3.exceptions.HTTPError as exc:
            # The request may have been processed: charge the full reservation (never under-count).
            self._settle(reservation_id, "settled", reserve_micros, reserve_tokens, policy, "llm.call_uncertain",
                         {"error": f"{type(exc).__name__}", "sent": sent,
                          "note": "no response; charged the reserved worst case"})
            return anthropic_error(504, "api_error", "no response from the Anthropic API; charged as worst case")
        out_headers = {k: v for k, v in resp.headers.items() if k.lower().startswith(_RETURN_HEADER_PREFIXES)}
        if streaming and resp.status == 200:
            out_headers.update({"X-Metis-Reserved-Micros": str(reserve_micros),
                                "X-Metis-Reservation-Id": str(reservation_id)})
            return GatewayResponse(200, b"", out_headers, stream=self._relay_stream(
                resp, raw, policy, price, model, task, reservation_id, reserve_micros, reserve_tokens,
                justification))
        if streaming:
            _ = resp.data  # an error answer to a streamed request is a plain JSON body: read it whole
        if resp.status != 200:
            # Upstream refused (400, 429, 529, 5xx...): nothing was generated, nothing is billed.
            self._settle(reservation_id, "released", 0, 0, policy, "llm.upstream_error",
                         {"status": resp.status, "upstream_request_id": resp.headers.get("request-id")})
            m.child(m.UPSTREAM_ERRORS, str(resp.status)).inc()
            return GatewayResponse(resp.status, resp.data, out_headers)
        try:
            body = json.loads(resp.data)
            usage = parse_usage(body.get("usage"), raw)
        except ValueError as exc:
            log.error("upstream 200 without readable usage; charging the worst case", extra={"error": str(exc)})
            usage = None
        if usage is None:
            cost, used_tokens, kinds = reserve_micros, reserve_tokens, {}
        else:
            kinds = cost_nanos(price, usage)
            cost = -(-sum(kinds.values()) // 1000)
            used_tokens = usage.total
        if cost > reserve_micros:
            # Cannot happen while the bound holds; charge what was spent and make it loud.
            log.error("settled cost exceeds the reservation", extra={"cost": cost, "reserved": reserve_micros})
            m.OVERRUNS.inc()
        audit: dict[str, Any] = {"upstream_request_id": resp.headers.get("request-id"),
                                 "latency_ms": round(upstream_seconds * 1000, 1)}
        if usage is not None:
            audit.update({"usage": usage.__dict__, "cache_hit_tokens": usage.cache_read,
                          "cost_nanos_by_kind": kinds, "stop_reason": body.get("stop_reason")})
        if justification:
            audit["justification"] = justification[:1000]
        settled = self._settle(reservation_id, "settled", cost, used_tokens, policy, "llm.call", audit)
        if usage is not None:
            m.observe_spend(task, model, price, usage, kinds)
        remaining = settled.get("remaining", {})
        out_headers.update({
            "X-Metis-Cost-Micros": str(cost), "X-Metis-Cost-USD": _usd(cost),
            "X-Metis-Reserved-Micros": str(reserve_micros), "X-Metis-Reservation-Id": str(reservation_id),
            "X-Metis-Gateway-Ms": f"{(time.perf_counter() - t0 - upstream_seconds) * 1000:.2f}",
        })
        for scope, header in (("run", "Run"), ("task_daily", "Task-Daily"), ("daily", "Daily"),
                              ("monthly", "Monthly")):
            if scope in remaining:
                out_headers[f"X-Metis-Remaining-{header}-USD"] = _usd(int(remaining[scope]))
        return GatewayResponse(200, resp.data, out_headers)

    def _relay_stream(self, resp: Any, raw: bytes, policy: Policy, price: Price, model: str, task: str,
                      reservation_id: uuid.UUID, reserve_micros: int, reserve_tokens: int,
                      justification: str) -> Iterator[bytes]:
        """Pass the SSE stream through unchanged while collecting usage from message_start / message_delta;
        settle when it ends. A stream that does not reach message_stop (client gone, upstream cut) is charged
        the full reservation: tokens may have been generated that no event reported."""
        usage: dict[str, Any] = {}
        buffer = b""
        complete = False
        try:
            for chunk in resp.stream(8192, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    try:
                        event = json.loads(line[5:])
                    except ValueError:
                        continue
                    etype = event.get("type") if isinstance(event, dict) else None
                    if etype == "message_start":
                        usage.update((event.get("message") or {}).get("usage") or {})
                    elif etype == "message_delta":
                        usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
                    elif etype == "message_stop":
                        complete = True
                yield chunk
        finally:
            resp.release_conn()
            parsed = None
            if complete:
                try:
                    parsed = parse_usage(usage, raw)
                except ValueError:
                    parsed = None
            if parsed is None:
                self._settle(reservation_id, "settled", reserve_micros, reserve_tokens, policy, "llm.call_uncertain",
                             {"stream": True, "note": "stream ended early; charged the reserved worst case"})
            else:
                kinds = cost_nanos(price, parsed)
                cost = -(-sum(kinds.values()) // 1000)
                audit: dict[str, Any] = {"stream": True, "usage": parsed.__dict__, "cache_hit_tokens": parsed.cache_read,
                                         "cost_nanos_by_kind": kinds}
                if justification:
                    audit["justification"] = justification[:1000]
                self._settle(reservation_id, "settled", cost, parsed.total, policy, "llm.call", audit)
                m.observe_spend(task, model, price, parsed, kinds)
                if cost > reserve_micros:
                    m.OVERRUNS.inc()

    def _settle(self, reservation_id: uuid.UUID, state: str, cost: int, tokens: int, policy: Policy, kind: str,
                audit: dict[str, Any]) -> dict[str, Any]:
        # If the ledger is down here the reservation stays open and the sweeper charges it in full later.
        try:
            with self._pool.connection() as conn:
                return repo.settle(conn, reservation_id=reservation_id, state=state, cost_micros=cost,
                                   used_tokens=tokens, thresholds=policy.thresholds_percent, audit_kind=kind,
                                   audit=audit)
        except (psycopg.Error, psycopg_pool.PoolTimeout):
            log.exception("settlement failed; the sweeper will charge the reservation in full")
            return {"ok": False, "remaining": {}}

    # -------------------------------------------------------------- count_tokens

    def count_tokens(self, raw: bytes, headers: Mapping[str, str], caller: str) -> GatewayResponse:
        """Free upstream endpoint: forwarded unchanged (refused while the kill switch is engaged)."""
        try:
            with self._pool.connection() as conn:
                ks = kill_switch_state(conn)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout):
            return anthropic_error(503, "api_error", "the guardrails ledger is unavailable (fail closed)",
                                   reason="ledger_unavailable")
        if ks["engaged"]:
            return deny("kill_switch_engaged", f"the kill switch is engaged by {ks['actor']}: {ks['reason']}")
        try:
            req = json.loads(raw)
        except ValueError:
            return invalid("request body is not valid JSON")
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            return invalid("model: Field required")
        fwd = self._forward_headers(headers)
        try:
            resp = self._http.urlopen("POST", self._base_path + "/v1/messages/count_tokens", body=raw, headers=fwd,
                                      timeout=urllib3.Timeout(connect=5.0, read=60.0), redirect=False)
        except urllib3.exceptions.HTTPError:
            return anthropic_error(502, "api_error", "the Anthropic API could not be reached")
        out = {k: v for k, v in resp.headers.items() if k.lower().startswith(_RETURN_HEADER_PREFIXES)}
        return GatewayResponse(resp.status, resp.data, out)

    # -------------------------------------------------------------- helpers

    def _forward_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        fwd = dict(self._fwd_base)
        for h in _FORWARD_HEADERS:
            v = _header(headers, h)
            if v:
                fwd[h] = v
        return fwd

    def _caps(self, policy: Policy, task: str) -> str:
        now = datetime.now(ZoneInfo(policy.timezone))
        key = (policy.digest, task, now.date())
        caps = self._caps_json.get(key)
        if caps is None:
            if len(self._caps_json) > 1000:
                self._caps_json.clear()
            caps = self._caps_json[key] = json.dumps(period_caps(policy, task, now))
        return caps

    def _run_facts(self, run_id: str) -> tuple[str, str] | None:
        facts = self._runs.get(run_id)
        if facts is None:
            with self._pool.connection() as conn:
                row = repo.run_task(conn, run_id)
            if row is None:
                return None
            facts = (row["task"], row["trigger"])
            if len(self._runs) > 50_000:
                self._runs.clear()
            self._runs[run_id] = facts
        return facts

    @staticmethod
    def _check_model(policy: Policy, task: str, trigger: str, model: str,
                     justification: str) -> tuple[str, str] | None:
        tp = policy.tasks.get(task)
        if tp is None:
            return "task_not_in_policy", f"task {task!r} is no longer in the policy"
        priced = policy.resolve_model(model)
        if priced is None or priced not in policy.tiers:
            return "model_not_allowed", f"model {model!r} has no price or tier in the policy"
        retired = policy.retired_on(priced, datetime.now(ZoneInfo(policy.timezone)).date())
        if retired is not None:
            return "model_retired", (f"model {model!r} was retired upstream on {retired.isoformat()}; "
                                     "the policy must move this task to its successor")
        if priced not in tp.models:
            return "model_not_allowed", (f"model {model!r} is not allowed for task {task!r} "
                                         f"(allowed: {', '.join(tp.models)})")
        tier = policy.tier(priced)
        if trigger == "schedule" and tier not in policy.scheduled_tiers:
            return "model_tier_not_allowed", (f"scheduled runs may only use {', '.join(policy.scheduled_tiers)} "
                                              f"models; {model!r} is {tier}")
        if tier == "top":
            if not tp.allow_top_tier:
                return "top_tier_not_allowed", f"task {task!r} may not use the top tier"
            if len(justification) < policy.justification_min_chars:
                return "justification_required", (f"the top tier needs a {JUSTIFICATION_HEADER} header of at least "
                                                   f"{policy.justification_min_chars} characters")
        return None


def _then(stream: Iterator[bytes], done: Any) -> Iterator[bytes]:
    try:
        yield from stream
    finally:
        done()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value

