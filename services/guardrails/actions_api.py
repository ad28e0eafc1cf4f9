"""HTTP API of write proposals, approvals and escalations (guardrails protocol steps 3-5)."""
from __future__ import annotations

from typing import Any

from flask import g

from shared.api import Api
from shared.web import ctx

from . import actions_schemas as s
from .actions import ActionService

actions_api = Api("guardrails_actions", __name__)


def _svc() -> ActionService:
    svc: ActionService = ctx().state["actions"]
    return svc


# ------------------------------------------------------------------ actions


@actions_api.route("/v1/actions", methods=["POST"], body=s.ActionCreate, response=s.ActionRead, status=201)
def propose(body: dict[str, Any]) -> Any:
    """Propose a write: executed (allowlisted), pending_approval (a human decides) or denied, naming the rule.
    The same idempotency key returns the same action (200) and never executes twice."""
    action, created = _svc().propose(caller=g.caller, **body)
    action["created"] = created
    return action, (201 if created else 200)


@actions_api.route("/v1/actions", query=s.ActionQuery, response=s.ActionRead, many=True)
def list_actions(query: dict[str, Any]) -> Any:
    """Actions newest first; filter by status (comma-separated), connector, operation, target, run, task, rule."""
    return _svc().find(**query)


@actions_api.route("/v1/actions/<action_id>", response=s.ActionRead)
def get_action(action_id: str) -> Any:
    """One action with its execution attempts and approval requests."""
    return _svc().get(action_id)


@actions_api.route("/v1/actions/<action_id>/decision", methods=["POST"], body=s.ActionDecision,
                   response=s.ActionRead, callers=("n8n",))
def decide(action_id: str, body: dict[str, Any]) -> Any:
    """A human's decision, relayed by n8n only: approve executes at once and returns the outcome.
    409 already_decided / approval_expired / not_pending, 404 unknown_action, 403 approver_not_allowed."""
    return _svc().decide(action_id=action_id, caller=g.caller, execution_id=g.get("n8n_execution_id"), **body)


@actions_api.route("/v1/actions/<action_id>/expire", methods=["POST"], body=s.ActionExpire, response=s.ActionRead,
                   callers=("n8n", "ops"))
def expire(action_id: str, body: dict[str, Any]) -> Any:
    """Nobody decided in time: pending -> expired (already expired: unchanged, `changed: false`)."""
    action, changed = _svc().expire(action_id=action_id, caller=g.caller, **body)
    action["changed"] = changed
    return action


@actions_api.route("/v1/actions/<action_id>/approval-request", methods=["POST"], body=s.ApprovalRequestCreate,
                   response=s.ActionRead, callers=("n8n",))
def approval_request(action_id: str, body: dict[str, Any]) -> Any:
    """n8n sent the approval request (Slack, e-mail) and waits in this execution: recorded in the audit log."""
    return _svc().register_request(action_id=action_id, caller=g.caller, **body)


@actions_api.route("/v1/actions/<action_id>/retry", methods=["POST"], body=s.ActionRetry, response=s.ActionRead,
                   callers=("ops",))
def retry(action_id: str, body: dict[str, Any]) -> Any:
    """Re-execute a failed action (its approval stands); the attempt first checks whether the write happened."""
    return _svc().retry(action_id=action_id, **body)


# ------------------------------------------------------------------ escalations


@actions_api.route("/v1/escalations", methods=["POST"], body=s.EscalationCreate, response=s.EscalationRead,
                   status=201)
def escalate(body: dict[str, Any]) -> Any:
    """Queue an item for a human and notify through n8n; never writes to the target system.
    One per run and subject: a resend returns the first (200)."""
    escalation, created = _svc().escalate(caller=g.caller, **body)
    escalation["created"] = created
    return escalation, (201 if created else 200)


@actions_api.route("/v1/escalations", query=s.EscalationQuery, response=s.EscalationRead, many=True)
def list_escalations(query: dict[str, Any]) -> Any:
    """Escalations newest first, filtered by status (open / resolved), task, subject, run, time."""
    return _svc().escalations(**query)


@actions_api.route("/v1/escalations/<escalation_id>", response=s.EscalationRead)
def get_escalation(escalation_id: str) -> Any:
    """One escalation."""
    return _svc().escalation(escalation_id)


@actions_api.route("/v1/escalations/<escalation_id>/resolve", methods=["POST"], body=s.EscalationResolve,
                   response=s.EscalationRead, callers=("ops", "n8n"))
def resolve(escalation_id: str, body: dict[str, Any]) -> Any:
    """Close an escalation (resolved / dismissed) with who and why; 409 when already closed."""
    return _svc().resolve(escalation_id=escalation_id, caller=g.caller, **body)
