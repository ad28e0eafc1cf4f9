"""Guardrails logic: policy store, runs, budgets, kill switch, audit verification, heartbeats, alerts, sweeper."""
from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping
from zoneinfo import ZoneInfo

import psycopg
import requests
from psycopg_pool import ConnectionPool

from shared.db import transaction
from shared.errors import Conflict, InvalidInput, MetisError, NotFound

from . import repository as repo
from .policy import Policy, micros_to_usd, policy_from_stored

log = logging.getLogger(__name__)
GENESIS = "0" * 64
RUN_STATUSES_FINAL = ("succeeded", "failed", "cancelled")


class Denied(MetisError):
    """A refusal by policy, budget or kill switch: 403, never worth retrying, with a stable reason code."""

    status, code, title = 403, "denied", "Denied by guardrails"


# ------------------------------------------------------------------ policy store


class PolicyStore:
    """The policy in force. Workers and replicas converge on the latest recorded version within ~1 s."""

    def __init__(self, pool: ConnectionPool, initial: Policy, *, refresh_seconds: float = 1.0) -> None:
        self._pool = pool
        self._policy = initial
        self._version: int | None = None
        self._checked = 0.0
        self._refresh = refresh_seconds
        self._lock = threading.Lock()

    def get(self) -> Policy:
        """The current policy; checks the database for a newer version at most once per refresh interval."""
        now = time.monotonic()
        if now - self._checked < self._refresh:
            return self._policy
        with self._lock:
            if now - self._checked < self._refresh:
                return self._policy
            self._checked = now
            try:
                with self._pool.connection() as conn:
                    latest = repo.policy_latest(conn)
                    if latest and latest["version"] != self._version:
                        if latest["digest"] != self._policy.digest:
                            doc = repo.policy_document(conn, latest["version"])
                            assert doc is not None
                            self._policy = policy_from_stored(doc["document"])
                        self._version = latest["version"]
            except psycopg.Error:
                log.warning("policy refresh failed; keeping the policy in force", exc_info=True)
            return self._policy

    def record(self, policy: Policy, *, actor: str) -> dict[str, Any]:
        """Make `policy` the one in force everywhere; audit it when it differs from the latest version."""
        with transaction(self._pool) as conn:
            repo.advisory_xact_lock(conn, "guardrails-policy")
            latest = repo.policy_latest(conn)
            if latest and latest["digest"] == policy.digest:
                result = {"changed": False, "version": latest["version"], "digest": policy.digest}
            else:
                previous: Mapping[str, Any] = {}
                if latest:
                    doc = repo.policy_document(conn, latest["version"])
                    previous = doc["document"] if doc else {}
                document = {"policy": policy.raw["policy"], "prices": policy.raw["prices"],
                            "source": policy.raw.get("source", "")}
                version = repo.policy_insert(conn, digest=policy.digest, document=document, actor=actor)
                changes = diff_paths({k: previous.get(k) for k in ("policy", "prices")},
                                     {k: document[k] for k in ("policy", "prices")}) if previous else ["(initial)"]
                repo.audit_append(conn, kind="policy.changed", actor=actor, subject=f"version {version}",
                                  data={"version": version, "digest": policy.digest,
                                        "previous_digest": latest["digest"] if latest else None,
                                        "changes": changes[:200]})
                repo.heartbeats_ensure(conn, list(policy.heartbeats))
                result = {"changed": True, "version": version, "digest": policy.digest, "changes": changes}
        with self._lock:
            self._policy = policy
            self._version = result["version"]
            self._checked = time.monotonic()
        return result


def diff_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two documents (for the policy-change audit entry)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out.extend(diff_paths(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [] if old == new else [prefix or "(root)"]


# ------------------------------------------------------------------ periods and caps


def period_caps(policy: Policy, task: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """The monthly, daily and task-daily cap rows a call of `task` falls under, in lock order."""
    local = (now or datetime.now(timezone.utc)).astimezone(ZoneInfo(policy.timezone))
    day, month = local.date().isoformat(), local.strftime("%Y-%m")
    caps = [{"key": f"monthly:{month}", "scope": "monthly", "rank": 0, "task": None, "period": month,
             "limit": policy.monthly_micros},
            {"key": f"daily:{day}", "scope": "daily", "rank": 1, "task": None, "period": day,
             "limit": policy.daily_micros}]
    if task in policy.tasks:
        caps.append({"key": f"task:{task}:{day}", "scope": "task_daily", "rank": 2, "task": task, "period": day,
                     "limit": policy.tasks[task].daily_micros})
    return caps


def budget_view(policy: Policy, conn: psycopg.Connection[Any], task: str | None = None) -> list[dict[str, Any]]:
    """Spent / reserved / remaining for the current period caps (monthly, daily, every task's daily)."""
    caps = period_caps(policy, task or "")
    periods = [c["period"] for c in caps]
    rows = {r["key"]: r for r in repo.caps_for_periods(conn, periods)}
    wanted = list(caps)
    if task is None:
        day = caps[1]["period"]
        wanted += [{"key": f"task:{t}:{day}", "scope": "task_daily", "rank": 2, "task": t, "period": day,
                    "limit": tp.daily_micros} for t, tp in sorted(policy.tasks.items())]
    out = []
    for cap in wanted:
        row = rows.get(cap["key"], {})
        spent, reserved = int(row.get("spent_micros", 0)), int(row.get("reserved_micros", 0))
        out.append({"key": cap["key"], "scope": cap["scope"], "task": cap["task"], "period": cap["period"],
                    "limit_micros": cap["limit"], "spent_micros": spent, "reserved_micros": reserved,
                    "remaining_micros": cap["limit"] - spent - reserved})
    return out


# ------------------------------------------------------------------ runs


def run_read(row: Mapping[str, Any]) -> dict[str, Any]:
    spent, reserved = int(row.get("spent_micros") or 0), int(row.get("reserved_micros") or 0)
    return {
        "id": str(row["id"]), "task": row["task"], "trigger": row["trigger"], "workflow": row["workflow"],
        "external_id": row["external_id"], "caller": row["caller"], "status": row["status"],
        "outcome": row["outcome"], "opened_at": row["opened_at"], "finished_at": row["finished_at"],
        "budget": {"limit_micros": row["budget_micros"], "spent_micros": spent, "reserved_micros": reserved,
                   "remaining_micros": row["budget_micros"] - spent - reserved,
                   "limit_usd": micros_to_usd(row["budget_micros"]), "spent_usd": micros_to_usd(spent),
                   "limit_tokens": row["budget_tokens"], "spent_tokens": int(row.get("spent_tokens") or 0),
                   "reserved_tokens": int(row.get("reserved_tokens") or 0)},
    }


def kill_switch_state(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    row = repo.kill_switch_get(conn)
    if not row:
        return {"engaged": False, "actor": None, "reason": None, "changed_at": None}
    return dict(row)


def ensure_not_killed(conn: psycopg.Connection[Any]) -> None:
    state = kill_switch_state(conn)
    if state["engaged"]:
        raise Denied(f"the kill switch is engaged by {state['actor']}: {state['reason']}",
                     code="kill_switch_engaged")


def record_run_denied(*, conn: psycopg.Connection[Any], caller: str, denied: Denied, task: str, trigger: str,
                      workflow: str, external_id: str | None) -> None:
    """Audit a refused run opening (kill switch, trigger, exhausted cap). Called in its own transaction: the
    refusal rolls back the opening's, and an unaudited refusal would hide why a job did not run."""
    repo.audit_append(conn, kind="run.denied", actor=caller, task=task,
                      subject=str(denied.extra.get("cap") or denied.code),
                      data={"reason": denied.code, "detail": denied.detail, "trigger": trigger, "workflow": workflow,
                            "external_id": external_id})


def open_run(*, conn: psycopg.Connection[Any], policy: Policy, caller: str, task: str, trigger: str,
             workflow: str, external_id: str | None) -> tuple[dict[str, Any], bool]:
    """Open a run (or return the one with the same task + external id); refuse when killed or out of budget."""
    if task not in policy.tasks:
        raise InvalidInput(f"unknown task {task!r}; known: {', '.join(sorted(policy.tasks))}",
                           extra={"errors": {"task": ["unknown task"]}})
    if external_id:
        existing = repo.run_by_external_id(conn, task, external_id)
        if existing:
            return run_read(existing), False
    tp = policy.tasks[task]
    if trigger not in tp.triggers:
        raise Denied(f"task {task!r} may not be triggered by {trigger!r} (allowed: {', '.join(tp.triggers)})",
                     code="trigger_not_allowed")
    ensure_not_killed(conn)
    for cap in budget_view(policy, conn, task):
        if cap["remaining_micros"] <= 0:
            raise Denied(f"the {cap['key']} cap is exhausted ({cap['spent_micros']} of {cap['limit_micros']} "
                         "micro-USD spent or reserved)", code=f"{cap['scope']}_cap_exhausted",
                         extra={"cap": cap["key"]})
    run_id = uuid.uuid4()
    row = repo.run_insert(conn, run_id=run_id, task=task, trigger=trigger, workflow=workflow,
                          external_id=external_id, caller=caller, budget_micros=tp.run_cap_micros,
                          budget_tokens=tp.run_cap_tokens)
    if row is None:  # a concurrent open with the same external id won; it committed before our insert returned
        existing = repo.run_by_external_id(conn, task, external_id or "")
        assert existing is not None
        return run_read(existing), False
    repo.run_cap_insert(conn, run_id=run_id, task=task, limit_micros=tp.run_cap_micros,
                        limit_tokens=tp.run_cap_tokens)
    repo.audit_append(conn, kind="run.opened", actor=caller, run_id=run_id, task=task, subject=workflow,
                      data={"trigger": trigger, "workflow": workflow, "external_id": external_id,
                            "budget_micros": tp.run_cap_micros, "budget_tokens": tp.run_cap_tokens})
    fresh = repo.run_get(conn, run_id)
    assert fresh is not None
    return run_read(fresh), True


def get_run(*, conn: psycopg.Connection[Any], run_id: str) -> dict[str, Any]:
    row = repo.run_get(conn, parse_uuid(run_id, "run_id"))
    if not row:
        raise NotFound(f"no run {run_id}", code="unknown_run")
    return run_read(row)


def finish_run(*, conn: psycopg.Connection[Any], caller: str, run_id: str, status: str,
               outcome: dict[str, Any]) -> dict[str, Any]:
    """Finish a run once; repeating the same status is a no-op, a different one is a 409."""
    rid = parse_uuid(run_id, "run_id")
    row = repo.run_get(conn, rid, for_update=True)
    if not row:
        raise NotFound(f"no run {run_id}", code="unknown_run")
    if row["status"] != "open":
        if row["status"] == status:
            return run_read(row)
        raise Conflict(f"run {run_id} is already {row['status']}", code="run_already_finished")
    repo.run_finish(conn, rid, status=status, outcome=outcome)
    repo.audit_append(conn, kind="run.finished", actor=caller, run_id=rid, task=row["task"], subject=status,
                      data={"status": status, "outcome": outcome, "spent_micros": int(row["spent_micros"] or 0),
                            "spent_tokens": int(row["spent_tokens"] or 0)})
    fresh = repo.run_get(conn, rid)
    assert fresh is not None
    return run_read(fresh)


def parse_uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidInput(f"{field} must be a UUID", extra={"errors": {field: ["not a UUID"]}}) from None


# ------------------------------------------------------------------ kill switch


def set_kill_switch(*, conn: psycopg.Connection[Any], engaged: bool, actor: str, reason: str,
                    caller: str) -> dict[str, Any]:
    """Engage or release; audited, and ops are alerted. Takes effect for every worker at once (read per request)."""
    prev = repo.kill_switch_set(conn, engaged=engaged, actor=actor, reason=reason)
    changed = prev is None or bool(prev["engaged"]) != engaged
    kind = "kill_switch.engaged" if engaged else "kill_switch.released"
    seq = repo.audit_append(conn, kind=kind, actor=actor, subject=reason,
                            data={"reason": reason, "via": caller, "changed": changed})
    if changed:
        repo.alert_enqueue(conn, dedupe_key=f"kill_switch:{seq}", kind=kind,
                           severity="critical" if engaged else "info",
                           payload={"engaged": engaged, "actor": actor, "reason": reason, "via": caller})
    state = kill_switch_state(conn)
    state["changed"] = changed
    return state


# ------------------------------------------------------------------ audit verification


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    head_seq: int | None
    first_broken_seq: int | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "head_seq": self.head_seq,
                "first_broken_seq": self.first_broken_seq, "problem": self.problem}


def entry_hash(prev_hash: str, canonical: str) -> str:
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def verify_audit(conn: psycopg.Connection[Any]) -> VerifyResult:
    """Walk the chain from the first entry; report the first entry whose link or content does not check out."""
    expected_seq, prev = 1, GENESIS
    checked = 0
    for row in repo.audit_chain(conn):
        seq = int(row["seq"])
        if seq != expected_seq:
            return VerifyResult(False, checked, None, expected_seq,
                                f"entry {expected_seq} is missing (next present entry is {seq})")
        if row["prev_hash"] != prev:
            return VerifyResult(False, checked, None, seq,
                                f"entry {seq} does not link to entry {seq - 1} (prev_hash mismatch)")
        if entry_hash(prev, row["canonical"]) != row["hash"]:
            return VerifyResult(False, checked, None, seq, f"entry {seq} was altered (content does not match its hash)")
        prev = row["hash"]
        expected_seq += 1
        checked += 1
    head = repo.audit_head(conn)
    last = expected_seq - 1
    if head is not None and (int(head["seq"]) != last or head["hash"] != (prev if last else head["hash"])):
        return VerifyResult(False, checked, int(head["seq"]), last + 1,
                            f"the chain head is at entry {head['seq']} but the log ends at entry {last} "
                            "(entries were deleted from the end)")
    return VerifyResult(True, checked, last or None)


def audit_read(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"seq": row["seq"], "at": row["at"].isoformat(), "kind": row["kind"], "actor": row["actor"],
            "run_id": str(row["run_id"]) if row["run_id"] else None, "task": row["task"],
            "subject": row["subject"], "data": row["data"], "prev_hash": row["prev_hash"], "hash": row["hash"]}


# ------------------------------------------------------------------ heartbeats


def beat(*, conn: psycopg.Connection[Any], policy: Policy, name: str, caller: str) -> dict[str, Any]:
    """Record a check-in; a heartbeat that was overdue recovers (audited + alert)."""
    hb = policy.heartbeats.get(name)
    if hb is None:
        raise NotFound(f"no heartbeat {name!r} in the policy; configured: {', '.join(sorted(policy.heartbeats))}",
                       code="unknown_heartbeat")
    row = repo.heartbeat_beat(conn, name)
    recovered = row["was_overdue_since"] is not None
    if recovered:
        repo.audit_append(conn, kind="heartbeat.recovered", actor=caller, subject=name,
                          data={"overdue_since": row["was_overdue_since"].isoformat()})
        repo.alert_enqueue(conn, dedupe_key=f"heartbeat:{name}:recovered:{row['was_overdue_since'].isoformat()}",
                           kind="heartbeat_recovered", severity="info",
                           payload={"name": name, "overdue_since": row["was_overdue_since"].isoformat()})
    return {"name": name, "last_at": row["last_at"], "beats": row["beats"], "recovered": recovered,
            "interval_seconds": hb.interval_seconds, "status": "ok"}


def heartbeat_list(*, conn: psycopg.Connection[Any], policy: Policy) -> list[dict[str, Any]]:
    rows = {r["name"]: r for r in repo.heartbeats_all(conn)}
    out = []
    for name, hb in sorted(policy.heartbeats.items()):
        r = rows.get(name)
        age = float(r["age_seconds"]) if r else None
        status = "unknown" if r is None else ("overdue" if r["overdue_since"] else
                                              ("late" if age is not None and age > hb.interval_seconds +
                                               hb.grace_seconds else "ok"))
        out.append({"name": name, "interval_seconds": hb.interval_seconds, "grace_seconds": hb.grace_seconds,
                    "last_at": r["last_beat_at"] if r else None, "age_seconds": age, "status": status,
                    "overdue_since": r["overdue_since"] if r else None, "beats": int(r["beats"]) if r else 0})
    return out


def check_heartbeats(pool: ConnectionPool, policy: Policy) -> list[str]:
    """Open an overdue episode (audit + one alert) for every late heartbeat; safe in many workers at once."""
    newly: list[str] = []
    with transaction(pool) as conn:
        repo.heartbeats_ensure(conn, list(policy.heartbeats))
        for name, hb in policy.heartbeats.items():
            row = repo.heartbeat_mark_overdue(conn, name, hb.interval_seconds + hb.grace_seconds)
            if row is None:
                continue
            since = row["overdue_since"].isoformat()
            payload = {"name": name, "interval_seconds": hb.interval_seconds, "grace_seconds": hb.grace_seconds,
                       "last_beat_at": row["last_beat_at"].isoformat() if row["last_beat_at"] else None,
                       "overdue_since": since}
            repo.audit_append(conn, kind="heartbeat.overdue", actor="guardrails", subject=name, data=payload)
            repo.alert_enqueue(conn, dedupe_key=f"heartbeat:{name}:overdue:{since}", kind="heartbeat_overdue",
                               severity="critical", payload=payload)
            newly.append(name)
    return newly


# ------------------------------------------------------------------ sweeper


def sweep_expired(pool: ConnectionPool, policy: Policy, *, limit: int = 100) -> int:
    """Charge every reservation whose caller vanished at its full reserved amount (never under-count)."""
    swept = 0
    with transaction(pool) as conn:
        for row in repo.reservations_expired(conn, limit=limit):
            r = repo.settle(conn, reservation_id=row["id"], state="expired", cost_micros=int(row["amount_micros"]),
                            used_tokens=int(row["tokens"]), thresholds=policy.thresholds_percent,
                            audit_kind="llm.reservation_expired",
                            audit={"note": "caller vanished; charged the full reserved amount"})
            swept += 1 if r.get("ok") else 0
    return swept


# ------------------------------------------------------------------ alert outbox


def deliver_alerts(pool: ConnectionPool, *, url: str, token: str | None, session: requests.Session,
                   limit: int = 20, timeout: float = 5.0) -> dict[str, int]:
    """Send due alerts; each row stays locked while it is sent, so two workers never send the same one.

    Delivered rows are never sent again; a failure is retried with capped exponential backoff. Receivers get
    `X-Metis-Alert-Id` to drop the rare duplicate after a crash between sending and recording.
    """
    sent = failed = 0
    with transaction(pool) as conn:
        for row in repo.alerts_due(conn, limit=limit):
            body = {"id": row["id"], "key": row["dedupe_key"], "kind": row["kind"], "severity": row["severity"],
                    "created_at": row["created_at"].isoformat(), "text": alert_text(row["kind"], row["payload"]),
                    **row["payload"]}
            headers = {"X-Metis-Alert-Id": str(row["id"]), "Idempotency-Key": row["dedupe_key"]}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                resp = session.post(url, json=body, headers=headers, timeout=timeout)
                ok = 200 <= resp.status_code < 300
                error = "" if ok else f"HTTP {resp.status_code}: {resp.text[:200]}"
            except requests.RequestException as exc:
                ok, error = False, f"{type(exc).__name__}: {exc}"
            if ok:
                repo.alert_delivered(conn, row["id"])
                sent += 1
            else:
                backoff = min(300.0, 2.0 * (2 ** min(int(row["attempts"]), 8)))
                repo.alert_failed(conn, row["id"], error=error, retry_in_seconds=backoff)
                failed += 1
    return {"sent": sent, "failed": failed}


def alert_text(kind: str, p: Mapping[str, Any]) -> str:
    """A one-line human summary for Slack and email."""
    if kind == "spend_threshold":
        return (f"Metis spend reached {p['threshold_percent']}% of the {p['scope']} cap {p['cap']}: "
                f"${micros_to_usd(int(p['spent_micros'])):.4f} of ${micros_to_usd(int(p['limit_micros'])):.2f}")
    if kind == "cap_exhausted":
        return (f"Metis {p['scope']} cap {p['cap']} is exhausted: LLM calls are being refused "
                f"(${micros_to_usd(int(p['spent_micros'])):.4f} spent, "
                f"${micros_to_usd(int(p['reserved_micros'])):.4f} in flight, of ${micros_to_usd(int(p['limit_micros'])):.2f})")
    if kind == "heartbeat_overdue":
        return f"Metis heartbeat '{p['name']}' is overdue (expected every {p['interval_seconds']} s)"
    if kind == "heartbeat_recovered":
        return f"Metis heartbeat '{p['name']}' recovered"
    if kind.startswith("kill_switch"):
        verb = "ENGAGED" if p.get("engaged") else "released"
        return f"Metis kill switch {verb} by {p.get('actor')}: {p.get('reason')}"
    return f"Metis alert {kind}"


# ------------------------------------------------------------------ watcher (dead man's switch)


def ping_watcher(pool: ConnectionPool, *, url: str, interval_seconds: float, session: requests.Session) -> bool:
    """Ping the external watcher once per interval across all workers/replicas, with the audit head as proof of life."""
    with transaction(pool) as conn:
        if not repo.watcher_claim(conn, interval_seconds):
            return False
        head = repo.audit_head(conn)
        killed = kill_switch_state(conn)["engaged"]
    body = {"service": "guardrails", "host": socket.gethostname(), "kill_switch": killed,
            "audit_head_seq": int(head["seq"]) if head else 0, "audit_head_hash": head["hash"] if head else GENESIS}
    try:
        resp = session.post(url, json=body, timeout=5)
        status = f"HTTP {resp.status_code}"
    except requests.RequestException as exc:
        status = f"{type(exc).__name__}"
    with transaction(pool) as conn:
        repo.watcher_status(conn, status)
    return True


# ------------------------------------------------------------------ background loops


class Background:
    """Periodic jobs in every worker; each is safe to run concurrently (SKIP LOCKED / conditional updates)."""

    def __init__(self, jobs: Mapping[str, tuple[float, Callable[[], Any]]]) -> None:
        self._jobs = jobs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="guardrails-background", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        due = {name: 0.0 for name in self._jobs}
        while not self._stop.is_set():
            now = time.monotonic()
            for name, (interval, fn) in self._jobs.items():
                if now >= due[name]:
                    due[name] = now + interval
                    try:
                        fn()
                    except Exception:  # a failing job must not kill the others; it runs again next interval
                        log.exception("background job failed", extra={"job": name})
            self._stop.wait(min(0.25, min(i for i, _ in self._jobs.values())))


def iter_ndjson(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    import json

    for row in rows:
        yield json.dumps(audit_read(row), default=str, separators=(",", ":")) + "\n"
