"""HTTP API of the guardrails service: runs, kill switch, audit, heartbeats, budgets, alerts, policy, LLM gateway."""
from __future__ import annotations

import os
from typing import Any

from flask import Response, g, request, stream_with_context

from shared.api import Api
from shared.auth import identify_caller
from shared.db import transaction
from shared.errors import Unauthorized
from shared.web import ctx

from . import repository as repo
from . import schemas as s
from . import service
from .gateway import Gateway, GatewayResponse, anthropic_error
from .policy import load_policy
from .service import PolicyStore

api = Api("guardrails", __name__)
gateway_api = Api("anthropic_gateway", __name__, url_prefix="/anthropic")
GATEWAY_PATHS = ("/anthropic/v1/messages", "/anthropic/v1/messages/count_tokens")
OPS = ("ops", "n8n")


def _policies() -> PolicyStore:
    store: PolicyStore = ctx().state["policies"]
    return store


# ------------------------------------------------------------------ runs


@api.route("/v1/runs", methods=["POST"], body=s.RunCreate, response=s.RunRead, status=201)
def open_run(body: dict[str, Any]) -> Any:
    """Open a run (idempotent on task + external_id); refused while killed or when a cap is exhausted."""
    try:
        with transaction(ctx().pool) as conn:
            run, created = service.open_run(conn=conn, policy=_policies().get(), caller=g.caller, **body)
    except service.Denied as denied:
        with transaction(ctx().pool) as conn:
            service.record_run_denied(conn=conn, caller=g.caller, denied=denied, task=body["task"],
                                      trigger=body["trigger"], workflow=body["workflow"],
                                      external_id=body.get("external_id"))
        raise
    run["created"] = created
    return run, (201 if created else 200)


@api.route("/v1/runs", query=s.RunQuery, response=s.RunRead, many=True)
def list_runs(query: dict[str, Any]) -> Any:
    """Runs, newest first, filtered by task, status, trigger and opening time."""
    with ctx().pool.connection() as conn:
        return [service.run_read(r) for r in repo.run_list(conn, **query)]


@api.route("/v1/runs/<run_id>", response=s.RunRead)
def get_run(run_id: str) -> Any:
    """One run with its budget: limit, spent, reserved, remaining."""
    with ctx().pool.connection() as conn:
        return service.get_run(conn=conn, run_id=run_id)


@api.route("/v1/runs/<run_id>/finish", methods=["POST"], body=s.RunFinish, response=s.RunRead)
def finish_run(run_id: str, body: dict[str, Any]) -> Any:
    """Finish a run with a status (once; the same status again is a no-op)."""
    with transaction(ctx().pool) as conn:
        return service.finish_run(conn=conn, caller=g.caller, run_id=run_id, **body)


# ------------------------------------------------------------------ kill switch


@api.route("/v1/kill-switch", response=s.KillSwitchRead)
def kill_switch() -> Any:
    """Whether the kill switch is engaged, by whom and why."""
    with ctx().pool.connection() as conn:
        return service.kill_switch_state(conn)


@api.route("/v1/kill-switch/engage", methods=["POST"], body=s.KillSwitchChange, response=s.KillSwitchRead,
           callers=OPS)
def engage(body: dict[str, Any]) -> Any:
    """Engage: every new run, LLM call and heartbeat-driven job is refused from the next request on."""
    with transaction(ctx().pool) as conn:
        return service.set_kill_switch(conn=conn, engaged=True, caller=g.caller, **body)


@api.route("/v1/kill-switch/release", methods=["POST"], body=s.KillSwitchChange, response=s.KillSwitchRead,
           callers=OPS)
def release(body: dict[str, Any]) -> Any:
    """Release the kill switch."""
    with transaction(ctx().pool) as conn:
        return service.set_kill_switch(conn=conn, engaged=False, caller=g.caller, **body)


# ------------------------------------------------------------------ audit


@api.route("/v1/audit", query=s.AuditQuery, callers=(*OPS, "guardrails"))
def audit(query: dict[str, Any]) -> Any:
    """Audit entries (oldest first) filtered by run, task, kind (prefix with '*'), time, after_seq; or NDJSON."""
    fmt = query.pop("format")
    if fmt == "ndjson" or "application/x-ndjson" in request.headers.get("Accept", ""):
        return _ndjson(query | {"limit": None if "limit" not in request.args else query["limit"]})
    with ctx().pool.connection() as conn:
        return s.AuditRead(many=True).dump([service.audit_read(r) for r in repo.audit_query(conn, **query)])


@api.route("/v1/audit/export", query=s.AuditQuery, callers=(*OPS, "guardrails"))
def audit_export(query: dict[str, Any]) -> Any:
    """NDJSON export of every matching entry (no limit unless given), streamed."""
    query.pop("format")
    return _ndjson(query | {"limit": None if "limit" not in request.args else query["limit"]})


def _ndjson(query: dict[str, Any]) -> Response:
    pool = ctx().pool

    def generate() -> Any:
        with pool.connection() as conn, conn.transaction():
            yield from service.iter_ndjson(repo.audit_query(conn, **query))

    return Response(stream_with_context(generate()), mimetype="application/x-ndjson")


@api.route("/v1/audit/verify", response=s.AuditVerifyRead, callers=(*OPS, "guardrails"))
def audit_verify() -> Any:
    """Recompute the hash chain; report the first broken link."""
    with ctx().pool.connection() as conn, conn.transaction():
        return service.verify_audit(conn).as_dict()


# ------------------------------------------------------------------ heartbeats


@api.route("/v1/heartbeats/<name>", methods=["POST"], response=s.HeartbeatRead)
def heartbeat(name: str) -> Any:
    """Check in. Recorded even while the kill switch is engaged, but then answered 403 so the job stops."""
    with transaction(ctx().pool) as conn:
        result = service.beat(conn=conn, policy=_policies().get(), name=name, caller=g.caller)
        killed = service.kill_switch_state(conn)
    if killed["engaged"]:
        raise service.Denied(f"the kill switch is engaged by {killed['actor']}: {killed['reason']}",
                             code="kill_switch_engaged")
    return result


@api.route("/v1/heartbeats", response=s.HeartbeatRead, many=True)
def heartbeats() -> Any:
    """Every configured heartbeat with its age and status (ok / late / overdue / unknown)."""
    with ctx().pool.connection() as conn:
        return service.heartbeat_list(conn=conn, policy=_policies().get())


# ------------------------------------------------------------------ budgets, alerts, policy


@api.route("/v1/budgets", response=s.BudgetsRead)
def budgets() -> Any:
    """Current-period caps (monthly, daily, per task) with spent, reserved and remaining micro-USD."""
    with ctx().pool.connection() as conn:
        caps = service.budget_view(_policies().get(), conn)
        res = repo.reservations_open_summary(conn)
    return {"caps": caps, "open_reservations": res["n"], "open_reserved_micros": res["micros"]}


@api.route("/v1/alerts", query=s.AlertQuery, response=s.AlertRead, many=True, callers=(*OPS, "guardrails"))
def alerts(query: dict[str, Any]) -> Any:
    """Alert outbox, newest first (pending=true for undelivered only)."""
    with ctx().pool.connection() as conn:
        return repo.alerts_list(conn, pending_only=query["pending"], limit=query["limit"])


@api.route("/v1/policy", response=s.PolicyRead)
def policy() -> Any:
    """The policy in force (digest, tasks, limits, heartbeats, the write allowlist)."""
    raw = _policies().get().raw["policy"]
    return {"digest": _policies().get().digest, "tasks": raw.get("tasks", {}), "limits": raw.get("limits", {}),
            "heartbeats": raw.get("heartbeats", {}), "actions": raw.get("actions", {})}


@api.route("/v1/policy/reload", methods=["POST"], response=s.PolicyReloadRead, callers=("ops",))
def reload_policy() -> Any:
    """Re-read policy.yaml + prices.yaml from this server's config dir; invalid files change nothing (400)."""
    from shared.errors import InvalidInput

    from .policy import PolicyError

    try:
        new = load_policy(ctx().settings.config_dir)
    except PolicyError as exc:
        raise InvalidInput(str(exc), code="invalid_policy",
                           extra={"errors": [{"path": p, "message": m} for p, m in exc.errors]}) from None
    return _policies().record(new, actor=f"api:{g.caller}")


# ------------------------------------------------------------------ the LLM gateway (Anthropic-shaped)


def _gateway_caller() -> str:
    """The SDK sends its key as x-api-key (api_key=) or Authorization: Bearer (auth_token=); accept both."""
    key = request.headers.get("x-api-key")
    header = f"Bearer {key}" if key else request.headers.get("Authorization")
    return identify_caller(header, ctx().settings.caller_tokens)


def _gateway_response(r: GatewayResponse) -> Response:
    # A stream is relayed as it arrives (settled by the gateway when it ends or the client goes away).
    resp = Response(r.stream if r.stream is not None else r.body, status=r.status, headers=r.headers,
                    direct_passthrough=r.stream is not None)
    resp.headers["X-Metis-Worker"] = str(os.getpid())  # which worker answered (ops debugging, multi-worker tests)
    return resp


def _gateway_call(fn_name: str) -> Response:
    try:
        g.caller = _gateway_caller()
    except Unauthorized as exc:
        return _gateway_response(anthropic_error(401, "authentication_error", exc.detail, retry=False))
    gw: Gateway = ctx().state["gateway"]
    fn = getattr(gw, fn_name)
    return _gateway_response(fn(request.get_data(cache=False), request.headers, g.caller))


@gateway_api.blueprint.post("/v1/messages")
def messages() -> Response:
    """Anthropic Messages API through the guardrails (non-streaming)."""
    return _gateway_call("messages")


@gateway_api.blueprint.post("/v1/messages/count_tokens")
def count_tokens() -> Response:
    """Anthropic token counting (free), forwarded."""
    return _gateway_call("count_tokens")
