"""HTTP API of the dedupe service: parse with marshmallow, call the service, dump the result."""
from __future__ import annotations

from typing import Any

from shared.api import Api
from shared.web import ctx

from . import schemas, service

api = Api("dedupe", __name__)


def _engine() -> service.Engine:
    return ctx().state["engine"]  # type: ignore[no-any-return]


def _ticket(d: dict[str, Any]) -> service.TicketIn:
    return service.TicketIn.from_dict(d, _engine().config.description_chars_stored)


def _filters(d: dict[str, Any]) -> service.Filters:
    return service.Filters(projects=d.get("project"), statuses=d.get("status"), clients=d.get("client"),
                           created_after=d.get("created_after"), created_before=d.get("created_before"),
                           exclude_keys=d.get("exclude_keys") or [])


@api.route("/v1/tickets", methods=["POST"], body=schemas.TicketBatchCreate, response=schemas.TicketBatchRead)
def upsert_tickets(body: dict[str, Any]) -> Any:
    """Index a batch of tickets (idempotent; unchanged tickets are not re-embedded)."""
    return service.upsert_tickets(engine=_engine(), tickets=[_ticket(t) for t in body["tickets"]])


@api.route("/v1/tickets/<key>", methods=["DELETE"], status=204)
def delete_ticket(key: str) -> Any:
    """Remove a ticket from the index."""
    service.delete_ticket(pool=_engine().pool, key=key)
    return "", 204


@api.route("/v1/duplicates", methods=["POST"], body=schemas.DuplicateQuery, response=schemas.DuplicateRead)
def duplicates(body: dict[str, Any]) -> Any:
    """Ranked duplicate candidates and a verdict for a ticket (idempotent per idempotency_key)."""
    engine = _engine()
    return service.check_duplicates(engine=engine, ticket=_ticket(body["ticket"]), limit=body["limit"],
                                    created_before=body["created_before"], filters=_filters(body["filters"]),
                                    idempotency_key=body["idempotency_key"], run_id=body["run_id"],
                                    index_ticket=body["index"], verifier=ctx().state.get("verifier"))


@api.route("/v1/similar", methods=["POST"], body=schemas.SimilarQuery, response=schemas.SimilarRead)
def similar(body: dict[str, Any]) -> Any:
    """Nearest resolved tickets with their resolutions (for triage)."""
    return service.similar_resolved(engine=_engine(), ticket=_ticket(body["ticket"]), limit=body["limit"],
                                    filters=_filters(body["filters"]))


@api.route("/v1/index", response=schemas.IndexStatsRead)
def index_stats() -> Any:
    """Size and revision of this worker's in-memory index."""
    emb, index = _engine().current()
    return {"tickets": len(index), "rev": index.rev, "embedder": emb.name, "stale_embedder": index.stale_embedder}
