"""HTTP API of the digest service: run a job (archives and returns a complete digest), read the archive."""
from __future__ import annotations

import uuid
from typing import Any

from shared.api import Api
from shared.errors import NotFound
from shared.web import ctx

from . import repository
from .narrative import Narrative
from .schemas import (DigestListQuery, DigestListRead, DigestRead, HealthCreate, HealthListRead, HealthQuery,
                      MonitorCreate, PatternsCreate, WeeklyCreate)
from .service import Deps, JobRequest, run_health, run_monitor, run_patterns, run_weekly

api = Api("digest", __name__)
CALLERS = ("n8n", "ops")


def _deps() -> Deps:
    return ctx().state["deps"]  # type: ignore[no-any-return]


def digest_view(row: dict[str, Any]) -> dict[str, Any]:
    """An archived row in the shape the API returns (and n8n delivers from)."""
    narrative = Narrative(row["narrative"], row["narrative_mode"], row["narrative_reason"], row["narrative_model"])
    return {**{k: row[k] for k in ("id", "kind", "run_id", "created_at", "as_of", "params", "summary", "data",
                                   "slack", "markdown")},
            "complete": True,
            "narrative": {"text": narrative.text, "mode": narrative.mode, "reason": narrative.reason,
                          "model": narrative.model, "note": narrative.note},
            "email": {"subject": row["email_subject"], "html": row["email_html"], "text": row["email_text"]}}


def _request(body: dict[str, Any]) -> JobRequest:
    overrides = dict(body.get("rules") or {})
    if body.get("limit"):
        overrides["limit"] = body["limit"]
    return JobRequest(run_id=body.get("run_id"), now=body.get("now"), jql=body.get("jql"), overrides=overrides,
                      narrative=body.get("narrative", "offline"), clients=body.get("clients"))


@api.route("/v1/monitor", methods=["POST"], body=MonitorCreate, response=DigestRead, status=201, callers=CALLERS)
def create_monitor(body: dict[str, Any]) -> dict[str, Any]:
    """Daily defect monitoring: stale tickets per priority, blockers, waiting too long, with reasons."""
    return digest_view(run_monitor(_deps(), _request(body)))


@api.route("/v1/digests", methods=["POST"], body=WeeklyCreate, response=DigestRead, status=201, callers=CALLERS)
def create_weekly(body: dict[str, Any]) -> dict[str, Any]:
    """The weekly digest: the N defects that need attention, by a transparent score, with a narrative."""
    return digest_view(run_weekly(_deps(), _request(body)))


@api.route("/v1/patterns", methods=["POST"], body=PatternsCreate, response=DigestRead, status=201, callers=CALLERS)
def create_patterns(body: dict[str, Any]) -> dict[str, Any]:
    """Cross-client patterns: clusters of similar tickets spanning several clients, trend vs the last window."""
    return digest_view(run_patterns(_deps(), _request(body)))


@api.route("/v1/health-scores", methods=["POST"], body=HealthCreate, response=DigestRead, status=201,
           callers=CALLERS)
def create_health(body: dict[str, Any]) -> dict[str, Any]:
    """Client health 0-100 with every component, stored for trends and exported as gauges."""
    return digest_view(run_health(_deps(), _request(body)))


@api.route("/v1/digests", methods=["GET"], query=DigestListQuery, response=DigestListRead, callers=CALLERS)
def list_digests(query: dict[str, Any]) -> dict[str, Any]:
    """Archived digests, newest first (filter by kind; page with `before`)."""
    with _deps().pool.connection() as conn:
        return {"digests": repository.list_digests(conn, kind=query["kind"], limit=query["limit"],
                                                   before=query["before"])}


@api.route("/v1/digests/<digest_id>", methods=["GET"], response=DigestRead, callers=CALLERS)
def get_digest(digest_id: str) -> dict[str, Any]:
    """One archived digest with every rendering, exactly as it was delivered."""
    try:
        did = uuid.UUID(digest_id)
    except ValueError:
        raise NotFound(f"no digest {digest_id!r}") from None
    with _deps().pool.connection() as conn:
        row = repository.get_digest(conn, digest_id=did)
    if row is None:
        raise NotFound(f"no digest {digest_id!r}")
    return digest_view(row)


@api.route("/v1/health-scores", methods=["GET"], query=HealthQuery, response=HealthListRead, callers=CALLERS)
def get_health(query: dict[str, Any]) -> dict[str, Any]:
    """Each client's latest health score with its components, change and history."""
    with _deps().pool.connection() as conn:
        latest = repository.latest_health(conn, client=query["client"])
        if query["client"] and not latest:
            raise NotFound(f"no health score for client {query['client']!r}")
        out = []
        for row in latest:
            history = repository.health_history(conn, client=row["client"], limit=query["history"])
            prev = history[1]["score"] if len(history) > 1 else None
            score = float(row["score"])
            out.append({**row, "score": score, "previous_score": float(prev) if prev is not None else None,
                        "delta": round(score - float(prev), 1) if prev is not None else None,
                        "history": [{**h, "score": float(h["score"])} for h in history]})
    out.sort(key=lambda r: (r["score"], r["client"]))
    return {"clients": out}
