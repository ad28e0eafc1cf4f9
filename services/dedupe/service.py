"""Dedupe logic: index tickets, find duplicates and similar resolved tickets, decide a verdict. No Flask here."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from psycopg_pool import ConnectionPool

from shared.db import transaction
from shared.embeddings import Embedder, content_hash
from shared.errors import MetisError, NotFound, Unavailable

from . import metrics, repository
from . import verdict as verdict_model
from .config import DedupeConfig
from .index import TicketIndex, TicketMeta, top_k
from .text import clean, for_embedding, tokens

log = logging.getLogger(__name__)

# Description text tokenised for BM25F: enough for the description_tokens kept (400 by default).
LEXICAL_CHARS = 6000
TEXT_FIELDS = ("project", "status", "resolution", "resolution_text", "priority", "client")


class IndexNotReady(Unavailable):
    code = "not_ready"
    title = "Not ready"


@dataclass
class TicketIn:
    """A ticket as the API receives it, already validated; text fields cleaned here."""

    key: str | None
    summary: str
    description: str = ""
    project: str | None = None
    status: str | None = None
    resolution: str | None = None
    resolution_text: str | None = None
    priority: str | None = None
    components: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    client: str | None = None
    created: datetime | None = None
    updated: datetime | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], max_description: int) -> "TicketIn":
        """Clean untrusted text: control characters, lone surrogates, oversized descriptions (truncated, not rejected)."""
        def opt(v: Any) -> str | None:
            c = clean(v) if isinstance(v, str) else None
            return c or None

        project = opt(d.get("project"))
        key = opt(d.get("key"))
        if project is None and key and "-" in key:
            project = key.rsplit("-", 1)[0]  # Jira keys carry their project
        raw_desc = (d.get("description") or "")[: max_description * 2]  # bound the cleaning work too
        return cls(key=key, summary=clean(d["summary"][:2000])[:1000], description=clean(raw_desc)[:max_description],
                   project=project, status=opt(d.get("status")), resolution=opt(d.get("resolution")),
                   resolution_text=opt(d.get("resolution_text")), priority=opt(d.get("priority")),
                   components=[c for c in (clean(x) for x in d.get("components") or []) if c],
                   labels=[c for c in (clean(x) for x in d.get("labels") or []) if c],
                   client=opt(d.get("client")), created=_utc(d.get("created")), updated=_utc(d.get("updated")))


def _utc(v: datetime | None) -> datetime | None:
    if v is None:
        return None
    return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v


class ModelHolder:
    """Loads the embedder in the background so the worker answers /healthz at once and /readyz honestly."""

    def __init__(self, factory: Callable[[], Embedder]) -> None:
        self._factory = factory
        self._embedder: Embedder | None = None
        self.error: str | None = None
        self._done = threading.Event()

    def load(self) -> None:
        try:
            self._embedder = self._factory()
        except Exception as exc:  # reported by /readyz and every search; never swallowed
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("embedding model failed to load", extra={"error": self.error})
        finally:
            self._done.set()

    def start(self) -> None:
        threading.Thread(target=self.load, name="dedupe-model-loader", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def get(self) -> Embedder:
        """The embedder, or a 503 saying why there is none."""
        if self._embedder is not None:
            return self._embedder
        if self.error:
            raise Unavailable(f"the embedding model failed to load ({self.error}); search is unavailable",
                              code="model_unavailable")
        raise IndexNotReady("the embedding model is still loading; retry shortly")

    def check(self) -> None:
        """Readiness: raise unless the model is loaded."""
        self.get()


@dataclass
class Engine:
    """What a worker holds: config, the model, and the in-memory index."""

    config: DedupeConfig
    pool: ConnectionPool
    model: ModelHolder
    index: TicketIndex | None = None
    loaded: threading.Event = field(default_factory=threading.Event)
    load_error: str | None = None

    def start(self, *, background: bool = True) -> None:
        """Load the model, then the index from PostgreSQL."""
        if self.config.embedding.threads > 0:
            # numpy's BLAS (the dense scan) gets the model's thread count too: on a shared 2-core machine two
            # BLAS threads per worker only queue behind each other and the other worker (2-5x slower under load).
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=self.config.embedding.threads, user_api="blas")

        def run() -> None:
            self.model.load()
            try:
                emb = self.model.get()
                index = TicketIndex(emb.dim, emb.name, self.config.lexical, self.config.description_tokens)
                t0 = time.perf_counter()
                n = index.refresh(self.pool)
                with index.lock:
                    index.lexical.compact()  # build BM25F once now rather than on the first query
                log.info("index loaded", extra={"tickets": n, "seconds": round(time.perf_counter() - t0, 2)})
                self.index = index
            except MetisError:
                pass  # the model error is already recorded and reported
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.exception("index failed to load")
            finally:
                self.loaded.set()

        if background:
            threading.Thread(target=run, name="dedupe-loader", daemon=True).start()
        else:
            run()

    def ready_check(self) -> None:
        """Raise unless model and index are usable."""
        self.model.check()
        if self.load_error:
            raise Unavailable(f"the index failed to load: {self.load_error}")
        if self.index is None:
            raise IndexNotReady("the index is still loading")

    def current(self) -> tuple[Embedder, TicketIndex]:
        """Model and index, caught up with PostgreSQL."""
        emb = self.model.get()
        self.ready_check()
        assert self.index is not None
        self.index.refresh(self.pool)
        return emb, self.index


# ---------------------------------------------------------------------------------------------- indexing

def _prepare(t: TicketIn, embedder_name: str, cfg: DedupeConfig) -> dict[str, Any]:
    text = for_embedding(t.summary, t.description, cfg.embed_max_chars)
    lex_s = tokens(t.summary)
    lex_d = tokens(for_embedding("", t.description, LEXICAL_CHARS))[: cfg.description_tokens]
    values: dict[str, Any] = {
        "key": t.key, "project": t.project, "summary": t.summary, "description": t.description,
        "status": t.status, "resolution": t.resolution, "resolution_text": t.resolution_text,
        "priority": t.priority, "components": t.components, "labels": t.labels, "client": t.client,
        "created": t.created, "updated": t.updated, "embedder": embedder_name,
        "content_hash": content_hash(embedder_name, text),
        "lex_summary": " ".join(lex_s), "lex_description": " ".join(lex_d), "_text": text,
    }
    values["row_hash"] = content_hash(values["content_hash"], *(
        "" if values[k] is None else str(values[k]) for k in
        ("project", "summary", "description", "status", "resolution", "resolution_text", "priority",
         "components", "labels", "client", "created", "updated")))
    return values


def upsert_tickets(*, engine: Engine, tickets: Sequence[TicketIn]) -> dict[str, int]:
    """Index a batch in one transaction; unchanged tickets are skipped, unchanged texts are not re-embedded."""
    emb = engine.model.get()
    cfg = engine.config
    latest: dict[str, TicketIn] = {}
    for t in tickets:
        assert t.key is not None
        latest[t.key] = t  # the last copy of a key in a batch wins
    prepared = [_prepare(t, emb.name, cfg) for t in latest.values()]
    with engine.pool.connection() as conn:
        existing = repository.existing_hashes(conn, [p["key"] for p in prepared])
        conn.rollback()
    changed = [p for p in prepared if p["key"] not in existing or existing[p["key"]]["deleted"]
               or existing[p["key"]]["row_hash"] != p["row_hash"]]
    to_embed = [p for p in changed if p["key"] not in existing or existing[p["key"]]["content_hash"] != p["content_hash"]
                or existing[p["key"]]["embedder"] != emb.name]
    embed_keys = {p["key"] for p in to_embed}
    for p in changed:
        if p["key"] not in embed_keys:  # same text, same model: reuse the stored vector
            p["embedding"] = bytes(existing[p["key"]]["embedding"])
    if to_embed:
        vecs = emb.embed([p["_text"] for p in to_embed])
        for p, v in zip(to_embed, vecs):
            p["embedding"] = np.asarray(v, dtype="<f4").tobytes()
    if changed:
        with transaction(engine.pool) as conn:
            last = repository.take_revs(conn, len(changed))
            repository.upsert_tickets(conn, changed, last - len(changed) + 1)
    metrics.INDEXED.labels("indexed").inc(len(changed))
    metrics.INDEXED.labels("embedded").inc(len(to_embed))
    return {"received": len(tickets), "indexed": len(changed), "embedded": len(to_embed),
            "unchanged": len(prepared) - len(changed)}


def delete_ticket(*, pool: ConnectionPool, key: str) -> None:
    """Remove a ticket from search (a tombstone keeps the workers in sync)."""
    with transaction(pool) as conn:
        if not repository.ticket_exists(conn, key):
            raise NotFound(f"ticket {key!r} is not indexed", code="ticket_not_found")
        rev = repository.take_revs(conn, 1)
        repository.mark_deleted(conn, key, rev)


# ---------------------------------------------------------------------------------------------- search

@dataclass
class Filters:
    """Validated filters (unknown names were already refused by the schema)."""

    projects: list[str] | None = None
    statuses: list[str] | None = None
    clients: list[str] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    exclude_keys: list[str] = field(default_factory=list)


@dataclass
class Hit:
    slot: int
    meta: TicketMeta
    score: float
    cosine: float
    lexical: float
    lexical_self: float
    days: float | None
    shared: list[str]
    cosine_best: float = 1.0    # best cosine among the eligible candidates (for the verdict's dense_gap)
    lexical_norm: float = 1.0   # BM25F / best BM25F among the eligible candidates (for lexical_gap)

    def evidence(self) -> verdict_model.Evidence:
        return verdict_model.Evidence(self.score, self.cosine, self.lexical_self, self.cosine_best,
                                      self.lexical_norm, self.days, self.meta.summary)


def _ts(d: datetime | None) -> float | None:
    return _utc(d).timestamp() if d is not None else None  # type: ignore[union-attr]


def search(*, engine: Engine, ticket: TicketIn, limit: int, filters: Filters, resolved_only: bool = False,
           exclude_resolutions: Iterable[str] = ()) -> tuple[list[Hit], int]:
    """Hybrid retrieval: BM25F and MiniLM cosine, fused by normalised scores plus a recency prior."""
    emb, index = engine.current()
    cfg = engine.config
    text = for_embedding(ticket.summary, ticket.description, cfg.embed_max_chars)
    qs = tokens(ticket.summary)
    qd = tokens(for_embedding("", ticket.description, LEXICAL_CHARS))[: cfg.description_tokens]
    qvec = emb.embed([text])[0]
    before = [x for x in (_ts(filters.created_before),) if x is not None]
    exclude = list(filters.exclude_keys) + ([ticket.key] if ticket.key else [])
    with index.lock:
        m = index.mask(created_before=min(before) if before else None, created_after=_ts(filters.created_after),
                       projects=filters.projects, statuses=filters.statuses, clients=filters.clients,
                       exclude_resolutions=exclude_resolutions, resolved_only=resolved_only, exclude_keys=exclude)
        eligible = int(m.sum())
        if eligible == 0:
            return [], 0
        bm = index.lexical.score(qs, qd, index.size)
        self_score = max(index.lexical.self_score(qs, qd), 1e-6)
        f = cfg.fusion
        # Candidate pool: the best of each retriever (a full fused sort of 100k rows is not needed).
        pool = min(f.pool, eligible)
        cand = set(index.dense_top(qvec, m, pool)) | set(top_k(np.where(m, bm, -np.inf), pool))
        cand_arr = np.fromiter(cand, dtype=np.int64)
        cand_arr = cand_arr[m[cand_arr]]
        cos = np.zeros(index.size, dtype=np.float32)  # exact cosines, filled in for the candidates only
        cos[cand_arr] = index.cosines(qvec, cand_arr)
        bm_max = float(bm[cand_arr].max()) if len(cand_arr) else 0.0
        q_time = _ts(ticket.created) or _ts(filters.created_before) or time.time()
        created = index.created[cand_arr]
        days = np.where(np.isfinite(created), np.maximum(q_time - created, 0.0) / 86400.0, np.nan)
        recency = np.where(np.isnan(days), 0.0, np.log1p(np.nan_to_num(days)))
        fused = (f.lexical * bm[cand_arr] / max(bm_max, 1e-6) + f.dense * cos[cand_arr] - f.recency * recency)
        order = np.argsort(-fused, kind="stable")[:limit]
        hits: list[Hit] = []
        cos_best = float(cos[cand_arr].max()) if len(cand_arr) else 0.0
        qterms = set(qs) | set(qd)
        for o in order:
            slot = int(cand_arr[o])
            meta = index.meta[slot]
            assert meta is not None
            doc = index.lexical.docs.get(slot)
            shared: list[str] = []
            if doc is not None and qterms:
                words = [index.lexical.terms[int(t)] for t in doc[0]]
                common = [w for w in words if w in qterms]
                df = index.lexical.df
                common.sort(key=lambda w: (df[index.lexical.vocab[w]], -len(w)))  # rarest, most specific first
                shared = common[:6]
            hits.append(Hit(slot, meta, float(fused[o]), float(cos[slot]), float(bm[slot]),
                            float(bm[slot]) / self_score, None if np.isnan(days[o]) else float(days[o]), shared,
                            cosine_best=cos_best, lexical_norm=float(bm[slot]) / max(bm_max, 1e-6)))
    return hits, eligible


def reasons(hit: Hit, ticket: TicketIn) -> list[str]:
    """Why a candidate was ranked: the evidence in words a triager can check."""
    out = [f"text similarity {hit.cosine:.2f}"]
    if hit.shared:
        out.append("shared terms: " + ", ".join(hit.shared))
    if ticket.components and set(c.lower() for c in ticket.components) & set(c.lower() for c in hit.meta.components):
        out.append("same component")
    if hit.days is not None:
        out.append(f"filed {hit.days:.0f} days earlier" if hit.days >= 1 else "filed the same day")
    return out


def verdict_for(hits: list[Hit], ticket: TicketIn, cfg: DedupeConfig) -> tuple[str, float, dict[str, float]]:
    """Offline verdict: the verdict model's probability for the best candidate against the calibrated thresholds."""
    if not hits:
        return "none", 0.0, {}
    x = verdict_model.features([h.evidence() for h in hits], 0, ticket.summary)
    p = cfg.verdict.model.probability(x)
    return verdict_model.decide(p, cfg.verdict.duplicate, cfg.verdict.possible), p, x


def candidate_dict(hit: Hit, ticket: TicketIn, *, confidence: float, with_resolution: bool = False) -> dict[str, Any]:
    m = hit.meta
    d: dict[str, Any] = {"key": m.key, "score": round(hit.score, 4), "summary": m.summary, "status": m.status,
                         "resolution": m.resolution, "project": m.project,
                         "created": m.created.isoformat() if m.created else None, "reasons": reasons(hit, ticket)}
    d["confidence"] = round(confidence, 4)
    if with_resolution:
        d.update({"resolution_text": m.resolution_text, "priority": m.priority, "components": m.components,
                  "labels": m.labels, "client": m.client})
    return d


def candidate_confidences(hits: list[Hit], ticket: TicketIn, cfg: DedupeConfig) -> list[float]:
    """The verdict model's probability for every candidate (its margin is over the best other candidate)."""
    ev = [h.evidence() for h in hits]
    return [cfg.verdict.model.probability(verdict_model.features(ev, i, ticket.summary)) for i in range(len(ev))]


# ---------------------------------------------------------------------------------------------- verdicts

def check_duplicates(*, engine: Engine, ticket: TicketIn, limit: int, created_before: datetime | None,
                     filters: Filters, idempotency_key: str | None = None, run_id: str | None = None,
                     index_ticket: bool = False, verifier: Any = None) -> dict[str, Any]:
    """Search, decide a verdict (offline, or confirmed by the LLM), optionally index the ticket; idempotent per key."""
    if idempotency_key:
        with engine.pool.connection() as conn:
            stored = repository.get_check(conn, idempotency_key)
            conn.rollback()
        if stored is not None:
            return {**stored, "replayed": True}
    if created_before is not None:
        filters.created_before = min(x for x in (created_before, filters.created_before) if x is not None)
    t0 = time.perf_counter()
    # Two candidates at least: the leader's margin over the runner-up is part of the verdict.
    hits, searched = search(engine=engine, ticket=ticket, limit=max(limit, 2), filters=filters)
    metrics.SEARCH_SECONDS.labels("duplicates").observe(time.perf_counter() - t0)
    cfg = engine.config
    verdict, confidence, features = verdict_for(hits, ticket, cfg)
    confidences = candidate_confidences(hits, ticket, cfg)
    hits = hits[:limit]
    candidates = [candidate_dict(h, ticket, confidence=c) for h, c in zip(hits, confidences)]
    mode, detail, llm_out = "offline", "verdict model and thresholds from config/dedupe.yaml", None
    if verdict != "none":
        mode, detail, verdict, llm_out = _maybe_verify(engine=engine, verifier=verifier, run_id=run_id,
                                                       ticket=ticket, hits=hits, verdict=verdict, detail=detail)
    response: dict[str, Any] = {"verdict": verdict, "confidence": round(confidence, 4),
                                "features": {k: round(v, 4) for k, v in features.items()}, "mode": mode,
                                "mode_detail": detail, "candidates": candidates, "searched": searched,
                                "llm": llm_out, "indexed": False, "replayed": False}
    metrics.VERDICTS.labels(verdict, mode).inc()
    if index_ticket:
        upsert_tickets(engine=engine, tickets=[ticket])
        response["indexed"] = True
    if idempotency_key:
        with transaction(engine.pool) as conn:
            response = repository.save_check(conn, idempotency_key, ticket.key, response)
    return response


def _maybe_verify(*, engine: Engine, verifier: Any, run_id: str | None, ticket: TicketIn, hits: list[Hit],
                  verdict: str, detail: str) -> tuple[str, str, str, dict[str, Any] | None]:
    from .llm import LlmDenied, LlmFailed

    if verifier is None:
        return "offline", detail + "; LLM verification not configured", verdict, None
    if not run_id:
        return "offline", detail + "; no run_id given, so no LLM call", verdict, None
    descriptions = _descriptions(engine.pool, [h.meta.key for h in hits[: engine.config.llm.top_k]])
    cands = [{"key": h.meta.key, "summary": h.meta.summary, "description": descriptions.get(h.meta.key, "")}
             for h in hits]
    try:
        v = verifier.verify(run_id=run_id, new={"key": ticket.key, "summary": ticket.summary,
                                                "description": ticket.description}, candidates=cands)
    except LlmDenied as exc:
        return "offline", f"{detail}; LLM denied by guardrails ({exc}), offline verdict stands", verdict, None
    except LlmFailed as exc:
        return "offline", f"{detail}; LLM verification failed ({exc}), offline verdict stands", verdict, None
    out = {"duplicate_of": v.duplicate_of, "confidence": v.confidence, "rationale": v.rationale}
    llm = engine.config.llm
    if v.duplicate_of is not None and v.confidence >= llm.min_confidence:
        return "llm", f"LLM ({llm.model}) confirmed {v.duplicate_of}", "duplicate", out
    if v.duplicate_of is not None:
        # A hesitant "yes" is not enough to link tickets unattended: a human compares (the comment names it).
        return "llm", (f"LLM ({llm.model}) named {v.duplicate_of} with confidence {v.confidence:.2f}, below "
                       f"llm.min_confidence {llm.min_confidence:.2f}: left for a human"), "possible", out
    # The model rejected every candidate: not a duplicate, but keep the candidates for a human to see.
    return "llm", f"LLM ({engine.config.llm.model}) found no duplicate among the top candidates", "possible", out


def _descriptions(pool: ConnectionPool, keys: list[str]) -> dict[str, str]:
    if not keys:
        return {}
    with pool.connection() as conn:
        rows = conn.execute("SELECT key, description FROM dedupe.tickets WHERE key = ANY(%s)", (keys,)).fetchall()
        conn.rollback()
    return {r["key"]: r["description"] for r in rows}  # type: ignore[call-overload,index]


def similar_resolved(*, engine: Engine, ticket: TicketIn, limit: int, filters: Filters) -> dict[str, Any]:
    """Nearest resolved tickets with their resolutions (triage's offline evidence)."""
    t0 = time.perf_counter()
    hits, searched = search(engine=engine, ticket=ticket, limit=limit, filters=filters, resolved_only=True,
                            exclude_resolutions=engine.config.similar_exclude)
    metrics.SEARCH_SECONDS.labels("similar").observe(time.perf_counter() - t0)
    confidences = candidate_confidences(hits, ticket, engine.config)
    return {"candidates": [candidate_dict(h, ticket, confidence=c, with_resolution=True)
                           for h, c in zip(hits, confidences)],
            "searched": searched}
