"""Writes as proposals: the allowlist decides, humans approve through n8n, guardrails executes exactly once.

Exactly once, end to end:
1. A proposal is one row per (caller, idempotency_key), inserted with ON CONFLICT DO NOTHING: twenty copies
   arriving together produce one row; the other nineteen read it back (a different payload under the same
   key is a 409) and wait for its outcome.
2. Execution is a state machine in PostgreSQL: approved -> executing is a conditional UPDATE that bumps the
   attempt number and sets a lease, committed BEFORE the write, so only one worker ever holds an attempt.
   The outcome is recorded by `attempt = n AND status = 'executing'`, so a worker that lost its lease can
   never overwrite a newer attempt.
3. A crash between the write and the recording leaves `executing` with an expired lease; recovery takes a
   new attempt, and every attempt after the first first looks in the target system (executors.reconcile:
   the comment's marker line, the link, the status) and records what it finds instead of writing again.
4. Inside an attempt, the HTTP layer never resends a write whose first copy may have arrived (executors).
Every state change appends to the hash-chained audit log in the same transaction.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

import psycopg
import requests
from marshmallow import ValidationError
from psycopg_pool import ConnectionPool

from shared.connectors.http import ConnectorError
from shared.db import transaction
from shared.errors import Conflict, Forbidden, InvalidInput, NotFound, Unavailable
from shared.settings import Secret, Settings

from . import actions_repository as arepo
from . import repository as repo
from .actions_policy import DEFAULT_RULE, ActionPolicy, Decision
from .executors import ExecutionError, Executors, Limits, Result
from .operations import known, summary, validate_proposal
from .service import Background, Denied, PolicyStore, kill_switch_state, parse_uuid

log = logging.getLogger(__name__)

FINAL = frozenset({"denied", "executed", "failed", "rejected", "expired"})
MAX_PAYLOAD_BYTES = 64 * 1024
STATUS_OF_MODE = {"allow": "approved", "approve": "pending_approval", "deny": "denied"}


def fingerprint(connector: str, operation: str, target: str, payload: Any) -> str:
    """What makes two proposals 'the same' under one idempotency key (not the run, not the reason)."""
    doc = json.dumps({"c": connector, "o": operation, "t": target, "p": payload}, sort_keys=True,
                     separators=(",", ":"), default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@dataclass
class ActionService:
    """Proposals, decisions, executions and escalations over one connection pool."""

    pool: ConnectionPool
    policies: PolicyStore
    executors: Executors
    actor: str = "guardrails"
    wait_poll_seconds: float = 0.05
    wait_seconds: float = 30.0

    # -------------------------------------------------------------- reading

    @property
    def action_policy(self) -> ActionPolicy:
        return self.policies.get().actions

    def read(self, row: Mapping[str, Any], *, detail: bool = False,
             conn: psycopg.Connection[Any] | None = None) -> dict[str, Any]:
        """The API view of an action: state, decision, outcome and a human summary of the write."""
        out = {k: row[k] for k in ("connector", "operation", "target", "payload", "reason", "idempotency_key",
                                   "rule", "mode", "policy_reason", "status", "decision", "approver",
                                   "decision_channel", "decision_comment", "attempts", "result", "last_error",
                                   "error_retryable", "outcome_unknown", "task", "caller")}
        out.update(id=str(row["id"]), run_id=str(row["run_id"]), action=f"{row['connector']}.{row['operation']}",
                   approval_id=str(row["id"]) if row["mode"] == "approve" else None,
                   expires_at=_iso(row["expires_at"]), decided_at=_iso(row["decided_at"]),
                   executed_at=_iso(row["executed_at"]), created_at=_iso(row["created_at"]),
                   updated_at=_iso(row["updated_at"]),
                   summary={**summary(connector=row["connector"], operation=row["operation"], target=row["target"],
                                      payload=row["payload"], jira_url=self.executors.jira_url),
                            "proposed_by": f"{row['task']} ({row['caller']}, run {row['run_id']})"})
        if detail and conn is not None:
            out["history"] = [{**a, "started_at": _iso(a["started_at"]), "finished_at": _iso(a["finished_at"])}
                              for a in arepo.attempts_of(conn, row["id"])]
            out["approval_requests"] = [{**r, "requested_at": _iso(r["requested_at"])}
                                        for r in arepo.approval_requests_of(conn, row["id"])]
        return out

    def _with_waiting(self, conn: psycopg.Connection[Any], row: Mapping[str, Any]) -> dict[str, Any]:
        out = self.read(row)
        if row["status"] == "approved":
            ks = kill_switch_state(conn)
            out["waiting"] = (f"kill switch engaged by {ks['actor']}: executes when released" if ks["engaged"]
                              else "queued for execution")
        return out

    def get(self, action_id: str) -> dict[str, Any]:
        """One action with its attempts and approval requests; 404 unknown_action."""
        aid = parse_uuid(action_id, "action_id")
        with self.pool.connection() as conn:
            row = arepo.action_get(conn, aid)
            if row is None:
                raise NotFound(f"no action {action_id}", code="unknown_action")
            out = self.read(row, detail=True, conn=conn)
            if row["status"] == "approved":
                out["waiting"] = self._with_waiting(conn, row)["waiting"]
            return out

    def find(self, **query: Any) -> list[dict[str, Any]]:
        """Actions, newest first, filtered (status may list several, comma-separated)."""
        status = query.pop("status", None)
        statuses = [s for s in (status or "").split(",") if s] or None
        with self.pool.connection() as conn:
            return [self.read(r) for r in arepo.action_list(conn, status=statuses, **query)]

    # -------------------------------------------------------------- proposing

    def propose(self, *, caller: str, run_id: uuid.UUID, connector: str, operation: str, target: str,
                payload: dict[str, Any], idempotency_key: str, reason: str,
                expires_in_seconds: int | None = None) -> tuple[dict[str, Any], bool]:
        """Decide a proposal by the allowlist: executed now, queued for approval, or denied. Idempotent."""
        fp = fingerprint(connector, operation, target, payload)
        with self.pool.connection() as conn:
            existing = arepo.action_by_key(conn, caller, idempotency_key)
            if existing is None:
                run = repo.run_task(conn, run_id)
        if existing is not None:
            return self._same_again(existing, fp), False
        if run is None:
            raise NotFound(f"no run {run_id}", code="unknown_run")
        if len(json.dumps(payload, default=str)) > MAX_PAYLOAD_BYTES:
            raise InvalidInput(f"payload larger than {MAX_PAYLOAD_BYTES} bytes",
                               extra={"errors": {"payload": ["too large"]}})
        action, action_id, policy = f"{connector}.{operation}", uuid.uuid4(), self.action_policy
        stored: dict[str, Any] = payload
        if not known(action):
            decision = Decision("deny", DEFAULT_RULE, f"unknown operation {action}: guardrails writes only "
                                f"{', '.join(sorted(r for r in _known_ops()))}")
        else:
            try:
                validated = validate_proposal(action=action, target=target, payload=payload, task=run["task"],
                                              action_id=action_id, link_types=self.executors.link_types)
            except ValidationError as exc:
                raise InvalidInput("invalid proposal: " + ", ".join(_paths(exc.messages)),
                                   extra={"errors": exc.messages}) from None
            except ConnectorError as exc:
                raise Unavailable(f"cannot check the link type with Jira ({exc}); retry later",
                                  code="jira_unavailable") from None
            decision, stored = policy.decide(action, validated.facts), validated.payload
        status = STATUS_OF_MODE[decision.mode]
        expires = None
        if decision.mode == "approve":
            expires = decision.expires_seconds or policy.expires_seconds
            if expires_in_seconds:
                expires = min(expires, expires_in_seconds)  # a proposer may shorten the window, never lengthen it
        with transaction(self.pool) as conn:
            run = repo.run_task(conn, run_id)
            if run is None:
                raise NotFound(f"no run {run_id}", code="unknown_run")
            if run["status"] != "open":
                raise Denied(f"run {run_id} is {run['status']}; open a run to propose writes", code="run_closed")
            state = kill_switch_state(conn)
            if state["engaged"]:
                raise Denied(f"the kill switch is engaged by {state['actor']}: {state['reason']}",
                             code="kill_switch_engaged")
            row = arepo.action_insert(conn, action_id=action_id, run_id=run_id, task=run["task"], caller=caller,
                                      connector=connector, operation=operation, target=target, payload=stored,
                                      reason=reason, idempotency_key=idempotency_key, fingerprint=fp,
                                      rule=decision.rule, mode=decision.mode, policy_reason=decision.explanation,
                                      status=status, expires_seconds=expires)
            if row is None:  # a concurrent copy committed first (the unique index made us wait for it)
                existing = arepo.action_by_key(conn, caller, idempotency_key)
                assert existing is not None
            else:
                repo.audit_append(conn, kind="action.denied" if status == "denied" else "action.proposed",
                                  actor=caller, run_id=run_id, task=run["task"], subject=action,
                                  data={"action_id": str(action_id), "target": target, "rule": decision.rule,
                                        "mode": decision.mode, "status": status, "why": decision.explanation,
                                        "reason": reason, "idempotency_key": idempotency_key,
                                        "expires_at": _iso(row["expires_at"])})
                if status == "pending_approval":
                    arepo.outbox_enqueue(conn, dedupe_key=f"approval:{action_id}", kind="approval_request",
                                         payload={"action_id": str(action_id), "action": action, "target": target,
                                                  "expires_at": _iso(row["expires_at"])})
        if row is None:
            assert existing is not None
            return self._same_again(existing, fp), False
        if status == "approved":
            return self.await_outcome(action_id), True
        return self.read(row), True

    def _same_again(self, existing: Mapping[str, Any], fp: str) -> dict[str, Any]:
        if existing["fingerprint"] != fp:
            raise Conflict(f"idempotency key {existing['idempotency_key']!r} was used for a different write "
                           f"(action {existing['id']})", code="idempotency_key_reused",
                           extra={"action": self.read(existing)})
        if existing["status"] in ("approved", "executing"):
            return self.await_outcome(existing["id"])
        return self.read(existing)

    def await_outcome(self, action_id: uuid.UUID | str, timeout: float | None = None) -> dict[str, Any]:
        """Execute an approved action (or wait for whoever is executing it) and return its final state.

        Returns early while the kill switch holds it, or when `timeout` passes (status `executing`)."""
        aid = uuid.UUID(str(action_id))
        # The executing thread itself is bounded by the execution limits; a waiter gives up sooner and
        # answers `executing` (its caller asks again with the same idempotency key, or reads GET /v1/actions/{id}).
        deadline = time.monotonic() + (timeout if timeout is not None else self.wait_seconds)
        while True:
            with self.pool.connection() as conn:
                row = arepo.action_get(conn, aid)
                assert row is not None
                if row["status"] == "approved" and kill_switch_state(conn)["engaged"]:
                    return self._with_waiting(conn, row)
            if row["status"] == "approved":
                done = self.execute_now(aid)
                if done is not None:
                    return done
            elif row["status"] == "executing":
                if row["lease_until"] is not None and row["lease_until"] < datetime.now(timezone.utc):
                    done = self.recover(aid)
                    if done is not None:
                        return done
            else:
                return self.read(row)
            if time.monotonic() > deadline:
                return self.read(row)
            time.sleep(self.wait_poll_seconds)

    # -------------------------------------------------------------- executing

    def execute_now(self, action_id: uuid.UUID) -> dict[str, Any] | None:
        """Claim an approved action and execute it; None if another worker claimed it (or the kill switch holds it)."""
        policy = self.action_policy
        with transaction(self.pool) as conn:
            if kill_switch_state(conn)["engaged"]:
                return None
            row = arepo.action_claim(conn, action_id, lease_seconds=policy.lease_seconds)
            if row is None:
                return None
            arepo.attempt_start(conn, action_id, row["attempts"], self.actor)
        return self._attempt(row, policy)

    def recover(self, action_id: uuid.UUID) -> dict[str, Any] | None:
        """Take over an execution abandoned by a crashed worker: reconcile with the target, then finish it."""
        policy = self.action_policy
        with transaction(self.pool) as conn:
            row = arepo.action_reclaim(conn, action_id, lease_seconds=policy.lease_seconds)
            if row is None:
                return None
            previous = row["attempts"] - 1
            arepo.attempt_finish(conn, action_id, previous, outcome="abandoned",
                                 error="the worker stopped before recording the outcome")
            arepo.attempt_start(conn, action_id, row["attempts"], self.actor)
            repo.audit_append(conn, kind="action.recovered", actor=self.actor, run_id=row["run_id"], task=row["task"],
                              subject=f"{row['connector']}.{row['operation']}",
                              data={"action_id": str(action_id), "abandoned_attempt": previous,
                                    "attempt": row["attempts"]})
        if not self.executors.can_reconcile(row):
            return self._record(row, None, ExecutionError(
                "an earlier attempt was abandoned mid-write and this kind of write cannot be looked up; not resent "
                "automatically — check the target, then retry with force", retryable=True, outcome_unknown=True))
        return self._attempt(row, policy)

    def _attempt(self, row: Mapping[str, Any], policy: ActionPolicy) -> dict[str, Any]:
        limits = Limits(http_attempts=policy.http_attempts, request_timeout_seconds=policy.request_timeout_seconds,
                        retry_budget_seconds=policy.retry_budget_seconds)
        try:
            result = self.executors.execute(row, attempt=row["attempts"], limits=limits)
        except ExecutionError as exc:
            return self._record(row, None, exc)
        except Exception as exc:  # a bug after the write may have left: never assume it did not happen
            log.exception("executor crashed", extra={"action_id": str(row["id"])})
            return self._record(row, None, ExecutionError(f"{type(exc).__name__}: {exc}"[:500], retryable=True,
                                                          outcome_unknown=True))
        return self._record(row, result, None)

    def _record(self, row: Mapping[str, Any], result: Result | None, error: ExecutionError | None) -> dict[str, Any]:
        aid, attempt = row["id"], row["attempts"]
        subject = f"{row['connector']}.{row['operation']}"
        with transaction(self.pool) as conn:
            if error is None:
                assert result is not None
                done = arepo.action_finish(conn, aid, attempt=attempt, status="executed", result=result.data,
                                           error=None, retryable=None, outcome_unknown=False)
            else:
                done = arepo.action_finish(conn, aid, attempt=attempt, status="failed", result=None,
                                           error=str(error)[:2000], retryable=error.retryable,
                                           outcome_unknown=error.outcome_unknown)
            if done is None:
                # A newer attempt took over (this one outlived its lease): it owns the outcome now.
                log.warning("attempt %s of action %s finished after losing its lease", attempt, aid)
                fresh = arepo.action_get(conn, aid)
                assert fresh is not None
                return self.read(fresh)
            if error is None:
                assert result is not None
                arepo.attempt_finish(conn, aid, attempt, outcome="reconciled" if result.reconciled else "executed",
                                     result=result.data)
                repo.audit_append(conn, kind="action.executed", actor=self.actor, run_id=row["run_id"],
                                  task=row["task"], subject=subject,
                                  data={"action_id": str(aid), "target": row["target"], "attempt": attempt,
                                        "result": result.data, "reconciled": result.reconciled,
                                        "rule": row["rule"], "approver": row["approver"]})
            else:
                arepo.attempt_finish(conn, aid, attempt,
                                     outcome="outcome_unknown" if error.outcome_unknown else "failed",
                                     error=str(error)[:2000])
                repo.audit_append(conn, kind="action.failed", actor=self.actor, run_id=row["run_id"],
                                  task=row["task"], subject=subject,
                                  data={"action_id": str(aid), "target": row["target"], "attempt": attempt,
                                        "error": str(error)[:1000], "retryable": error.retryable,
                                        "outcome_unknown": error.outcome_unknown})
                repo.alert_enqueue(conn, dedupe_key=f"action_failed:{aid}:{attempt}", kind="action_failed",
                                   severity="warning", payload={
                                       "action_id": str(aid), "action": subject, "target": row["target"],
                                       "error": str(error)[:500],
                                       "text": f"Metis could not execute {subject} on {row['target']} (action {aid}, "
                                               f"attempt {attempt}): {str(error)[:300]} — POST /v1/actions/{aid}/retry"})
            return self.read(done)

    def retry(self, *, action_id: str, actor: str, reason: str, force: bool = False) -> dict[str, Any]:
        """An operator re-runs a failed action (the approval stands); its next attempt reconciles first."""
        aid = parse_uuid(action_id, "action_id")
        with transaction(self.pool) as conn:
            row = arepo.action_get(conn, aid, for_update=True)
            if row is None:
                raise NotFound(f"no action {action_id}", code="unknown_action")
            if row["status"] != "failed":
                raise Conflict(f"action {action_id} is {row['status']}; only a failed action can be retried",
                               code="not_failed", extra={"action": self.read(row)})
            if row["outcome_unknown"] and not self.executors.can_reconcile(row) and not force:
                raise Conflict("the last attempt may have been written and this kind of write cannot be looked up: "
                               "check the target, then retry with force: true", code="outcome_unknown",
                               extra={"action": self.read(row)})
            arepo.action_requeue(conn, aid)
            repo.audit_append(conn, kind="action.retry_requested", actor=actor, run_id=row["run_id"],
                              task=row["task"], subject=f"{row['connector']}.{row['operation']}",
                              data={"action_id": str(aid), "reason": reason, "force": force,
                                    "last_error": row["last_error"]})
        return self.await_outcome(aid)

    # -------------------------------------------------------------- deciding

    def decide(self, *, action_id: str, decision: str, approver: str, channel: str, comment: str | None,
               caller: str, execution_id: str | None = None) -> dict[str, Any]:
        """Record a human decision once; approve executes at once. 404 unknown, 409 decided / expired."""
        aid = parse_uuid(action_id, "action_id")
        approver = approver.strip()
        problem: Conflict | None = None
        row: Mapping[str, Any] | None
        with transaction(self.pool) as conn:
            row = arepo.action_get(conn, aid, for_update=True)
            if row is None:
                raise NotFound(f"no action {action_id}", code="unknown_action")
            subject = f"{row['connector']}.{row['operation']}"
            if row["status"] == "pending_approval" and row["expires_at"] <= datetime.now(timezone.utc):
                row = self._expire_locked(conn, row, actor=self.actor, why="approval window ended",
                                          late_decision={"by": approver, "decision": decision, "channel": channel})
            if row["status"] != "pending_approval":
                code = {"expired": "approval_expired", "rejected": "already_decided",
                        "denied": "not_pending"}.get(row["status"], "already_decided" if row["decision"]
                                                     else "not_pending")
                problem = Conflict(f"action {action_id} is {row['status']}"
                                   + (f" (decided by {row['approver']})" if row["approver"] else "")
                                   + (f" (expired at {_iso(row['expires_at'])})" if row["status"] == "expired" else ""),
                                   code=code, extra={"action": self.read(row)})
            elif not self.action_policy.approver_allowed(approver):
                raise Forbidden(f"{approver!r} may not decide (actions.approval.approvers)",
                                code="approver_not_allowed")
            else:
                row = arepo.action_decide(conn, aid, decision=decision, approver=approver, channel=channel,
                                          comment=comment)
                repo.audit_append(conn, kind="action.decided", actor=approver, run_id=row["run_id"], task=row["task"],
                                  subject=subject,
                                  data={"action_id": str(aid), "decision": decision, "approver": approver,
                                        "channel": channel, "comment": comment, "via": caller,
                                        "n8n_execution_id": execution_id, "target": row["target"]})
        if problem is not None:
            raise problem  # after the commit: an expiry found on the way is kept
        if decision == "approve":
            return self.await_outcome(aid)
        return self.read(row)

    def _expire_locked(self, conn: psycopg.Connection[Any], row: Mapping[str, Any], *, actor: str, why: str,
                       **extra: Any) -> Mapping[str, Any]:
        done = arepo.action_expire(conn, row["id"])
        if done is None:
            return row
        repo.audit_append(conn, kind="action.expired", actor=actor, run_id=row["run_id"], task=row["task"],
                          subject=f"{row['connector']}.{row['operation']}",
                          data={"action_id": str(row["id"]), "target": row["target"], "why": why,
                                "expires_at": _iso(row["expires_at"]), **extra})
        return done

    def expire(self, *, action_id: str, actor: str, caller: str) -> tuple[dict[str, Any], bool]:
        """The approval window is over (n8n's timeout): pending -> expired; already expired is a no-op."""
        aid = parse_uuid(action_id, "action_id")
        with transaction(self.pool) as conn:
            row = arepo.action_get(conn, aid, for_update=True)
            if row is None:
                raise NotFound(f"no action {action_id}", code="unknown_action")
            if row["status"] == "expired":
                return self.read(row), False
            if row["status"] != "pending_approval":
                raise Conflict(f"action {action_id} is {row['status']}", code="already_decided"
                               if row["decision"] else "not_pending", extra={"action": self.read(row)})
            done = self._expire_locked(conn, row, actor=actor, why=f"nobody decided in time (via {caller})")
            return self.read(done), True

    def register_request(self, *, action_id: str, execution_id: str, channels: Sequence[str],
                         caller: str) -> dict[str, Any]:
        """n8n asked humans (Slack, e-mail) and waits in execution `execution_id`: recorded and audited."""
        aid = parse_uuid(action_id, "action_id")
        with transaction(self.pool) as conn:
            row = arepo.action_get(conn, aid)
            if row is None:
                raise NotFound(f"no action {action_id}", code="unknown_action")
            if row["status"] != "pending_approval":
                raise Conflict(f"action {action_id} is {row['status']}", code="not_pending",
                               extra={"action": self.read(row)})
            if arepo.approval_request_add(conn, aid, execution_id=execution_id, channels=channels):
                repo.audit_append(conn, kind="action.approval_requested", actor=caller, run_id=row["run_id"],
                                  task=row["task"], subject=f"{row['connector']}.{row['operation']}",
                                  data={"action_id": str(aid), "n8n_execution_id": execution_id,
                                        "channels": list(channels), "expires_at": _iso(row["expires_at"])})
            return self.read(row, detail=True, conn=conn)

    # -------------------------------------------------------------- background

    def sweep(self, *, limit: int = 50) -> dict[str, int]:
        """Expire overdue approvals, recover abandoned executions, execute approved actions (kill switch allowing)."""
        expired = recovered = executed = 0
        with transaction(self.pool) as conn:
            for row in arepo.actions_overdue(conn, limit=limit):
                self._expire_locked(conn, row, actor=self.actor, why="approval window ended")
                expired += 1
        with self.pool.connection() as conn:
            abandoned = [r["id"] for r in arepo.actions_abandoned(conn, limit=limit)]
            killed = kill_switch_state(conn)["engaged"]
            approved = [] if killed else [r["id"] for r in arepo.actions_approved(conn, limit=limit)]
        for aid in abandoned:
            recovered += 1 if self.recover(aid) is not None else 0
        for aid in approved:
            executed += 1 if self.execute_now(aid) is not None else 0
        return {"expired": expired, "recovered": recovered, "executed": executed}

    # -------------------------------------------------------------- escalations

    def escalate(self, *, caller: str, run_id: uuid.UUID, reason: str, subject: str,
                 context: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Queue an item for a human (never writes to the target system); one per run and subject."""
        with transaction(self.pool) as conn:
            run = repo.run_task(conn, run_id)
            if run is None:
                raise NotFound(f"no run {run_id}", code="unknown_run")
            eid = uuid.uuid4()
            row = arepo.escalation_insert(conn, escalation_id=eid, run_id=run_id, task=run["task"], caller=caller,
                                          subject=subject, reason=reason, context=context)
            if row is None:
                existing = arepo.escalation_by_subject(conn, run_id, subject)
                assert existing is not None
                return escalation_read(existing), False
            repo.audit_append(conn, kind="escalation.filed", actor=caller, run_id=run_id, task=run["task"],
                              subject=subject, data={"escalation_id": str(eid), "reason": reason[:1000]})
            arepo.outbox_enqueue(conn, dedupe_key=f"escalation:{eid}", kind="escalation",
                                 payload={"escalation_id": str(eid)})
            return escalation_read(row), True

    def resolve(self, *, escalation_id: str, actor: str, resolution: str, comment: str | None,
                caller: str) -> dict[str, Any]:
        """Close an escalation once (409 when already resolved)."""
        eid = parse_uuid(escalation_id, "escalation_id")
        with transaction(self.pool) as conn:
            row = arepo.escalation_get(conn, eid, for_update=True)
            if row is None:
                raise NotFound(f"no escalation {escalation_id}", code="unknown_escalation")
            if row["status"] == "resolved":
                raise Conflict(f"escalation {escalation_id} was already {row['resolution']} by {row['resolved_by']}",
                               code="already_resolved", extra={"escalation": escalation_read(row)})
            row = arepo.escalation_resolve(conn, eid, resolution=resolution, actor=actor, comment=comment)
            repo.audit_append(conn, kind="escalation.resolved", actor=actor, run_id=row["run_id"], task=row["task"],
                              subject=row["subject"], data={"escalation_id": str(eid), "resolution": resolution,
                                                            "comment": comment, "via": caller})
            return escalation_read(row)

    def escalation(self, escalation_id: str) -> dict[str, Any]:
        eid = parse_uuid(escalation_id, "escalation_id")
        with self.pool.connection() as conn:
            row = arepo.escalation_get(conn, eid)
        if row is None:
            raise NotFound(f"no escalation {escalation_id}", code="unknown_escalation")
        return escalation_read(row)

    def escalations(self, **query: Any) -> list[dict[str, Any]]:
        with self.pool.connection() as conn:
            return [escalation_read(r) for r in arepo.escalation_list(conn, **query)]

    # -------------------------------------------------------------- n8n outbox

    def deliver(self, *, kind: str, url: str, token: str | None, session: requests.Session, limit: int = 10,
                timeout: float = 15.0) -> dict[str, int]:
        """Hand due approval requests / escalations to their n8n workflow; failures retry with backoff."""
        sent = failed = skipped = 0
        with transaction(self.pool) as conn:
            for row in arepo.outbox_due(conn, kinds=[kind], limit=limit):
                body = dict(row["payload"])
                if kind == "approval_request":
                    action = arepo.action_get(conn, body["action_id"])
                    if action is None or action["status"] != "pending_approval":
                        arepo.outbox_delivered(conn, row["id"], note=f"skipped: action is "
                                               f"{action['status'] if action else 'gone'}")
                        skipped += 1
                        continue
                headers = {"Idempotency-Key": row["dedupe_key"], "X-Metis-Outbox-Id": str(row["id"])}
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                try:
                    resp = session.post(url, json={"kind": kind, **body}, headers=headers, timeout=timeout)
                    ok, error = 200 <= resp.status_code < 300, f"HTTP {resp.status_code}: {resp.text[:200]}"
                except requests.RequestException as exc:
                    ok, error = False, f"{type(exc).__name__}: {exc}"
                if ok:
                    arepo.outbox_delivered(conn, row["id"])
                    sent += 1
                else:
                    arepo.outbox_failed(conn, row["id"], error=error,
                                        retry_in_seconds=min(300.0, 2.0 * (2 ** min(int(row["attempts"]), 8))))
                    failed += 1
        return {"sent": sent, "failed": failed, "skipped": skipped}


def escalation_read(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out.update(id=str(row["id"]), run_id=str(row["run_id"]), created_at=_iso(row["created_at"]),
               resolved_at=_iso(row["resolved_at"]), raised_by=f"{row['task']} ({row['caller']}, run {row['run_id']})")
    return out


def _paths(messages: Any, prefix: str = "") -> list[str]:
    """Dotted field names from marshmallow's nested error messages."""
    if isinstance(messages, dict):
        out: list[str] = []
        for k, v in messages.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            nested = _paths(v, path) if isinstance(v, dict) else []
            out.extend(nested or [path])
        return out
    return [prefix] if prefix else []


def _known_ops() -> list[str]:
    from .operations import PAYLOADS

    return list(PAYLOADS)


# ------------------------------------------------------------------ wiring


def executors_from_settings(settings: Settings, env: Mapping[str, str] | None = None) -> Executors:
    """Guardrails' own write credentials: Jira (URL, e-mail, API token) and the Slack incoming webhook."""
    env = os.environ if env is None else env
    extra = settings.extra
    token = env.get("METIS_JIRA_API_TOKEN")
    slack = extra.get("METIS_SLACK_WEBHOOK_URL") or env.get("METIS_SLACK_WEBHOOK_URL")
    return Executors(jira_url=extra.get("METIS_JIRA_URL"), jira_email=extra.get("METIS_JIRA_EMAIL"),
                     jira_token=Secret(token) if token else None, slack_webhook_url=Secret(slack) if slack else None)


def background(svc: ActionService, settings: Settings, env: Mapping[str, str] | None = None) -> Background:
    """Sweeps (expiry, crash recovery, approved-after-release) and the n8n outbox, on their own thread so a
    slow write never delays the budget sweeper or alerts."""
    env = os.environ if env is None else env
    extra = settings.extra
    session = requests.Session()
    jobs: dict[str, tuple[float, Callable[[], Any]]] = {
        "actions-sweep": (float(extra.get("METIS_ACTIONS_SWEEP_SECONDS", "2")), svc.sweep)}
    n8n_token = settings.caller_tokens.get("n8n")
    token = n8n_token.get() if n8n_token else None
    poll = float(extra.get("METIS_NOTIFY_POLL_SECONDS", "1"))
    for kind, var in (("approval_request", "METIS_APPROVAL_WEBHOOK_URL"), ("escalation", "METIS_ESCALATION_WEBHOOK_URL")):
        url = extra.get(var)
        if url:
            jobs[f"notify-{kind}"] = (poll, lambda kind=kind, url=url: svc.deliver(  # type: ignore[misc]
                kind=kind, url=url, token=token, session=session))
    return Background(jobs)
