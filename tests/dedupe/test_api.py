"""The dedupe HTTP API with the real model and real PostgreSQL (Flask test client, in-process)."""
from __future__ import annotations

import json
from typing import Any, Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from services.dedupe.config import load_config
from services.dedupe.verdict import FEATURES
from shared.embeddings import MiniLMEmbedder, MiniLMOptions
from tests.conftest import auth

from .conftest import index, ticket

pytestmark = pytest.mark.xdist_group("dedupe")

CORPUS = [
    ticket("HAD-1", "NullPointerException in FileSystem.getFileStatus when the path does not exist",
           "Calling getFileStatus on a missing path throws java.lang.NullPointerException\n"
           "\tat org.apache.hadoop.fs.FileSystem.getFileStatus(FileSystem.java:1520)",
           created="2024-01-01T09:00:00Z", status="Resolved", resolution="Fixed",
           resolution_text="Return FileNotFoundException instead of dereferencing null.", components=["fs"]),
    ticket("HAD-2", "Upgrade Netty to 4.1.100 to fix CVE-2023-44487", "Netty has a CVE, bump the version.",
           created="2024-01-02T09:00:00Z", status="Open"),
    ticket("HAD-3", "Payroll export misses overtime hours for night shifts",
           "The CSV export of the payroll run does not include overtime worked after midnight.",
           created="2024-01-03T09:00:00Z", status="Resolved", resolution="Duplicate"),
    ticket("HAD-4", "Documentation typo in the S3A committer guide", "There is a typo in committers.md.",
           created="2024-01-04T09:00:00Z", status="Resolved", resolution="Fixed", project="DOC"),
    ticket("HAD-5", "YARN ResourceManager web UI shows wrong queue capacity",
           "The capacity scheduler page reports 200% for the default queue.", created="2024-01-05T09:00:00Z",
           status="In Progress"),
]
QUERY = {"summary": "NPE from FileSystem.getFileStatus for a path that is missing",
         "description": "java.lang.NullPointerException thrown by getFileStatus when the file was deleted",
         "created": "2024-02-01T09:00:00Z", "components": ["fs"]}


def dup(client: FlaskClient, body: dict[str, Any]) -> Any:
    return client.post("/v1/duplicates", json=body, headers=auth("n8n"))


def test_upsert_is_idempotent_and_reembeds_only_changed_text(client: FlaskClient) -> None:
    first = index(client, CORPUS)
    assert first == {"received": 5, "indexed": 5, "embedded": 5, "unchanged": 0}
    assert index(client, CORPUS) == {"received": 5, "indexed": 0, "embedded": 0, "unchanged": 5}
    status_only = dict(CORPUS[1], status="Resolved", resolution="Fixed")
    assert index(client, [status_only]) == {"received": 1, "indexed": 1, "embedded": 0, "unchanged": 0}
    new_text = dict(CORPUS[1], summary="Upgrade Netty to 4.1.101")
    assert index(client, [new_text])["embedded"] == 1
    stats = client.get("/v1/index", headers=auth("n8n")).get_json()
    assert stats["tickets"] == 5 and stats["embedder"].startswith("all-MiniLM-L6-v2")


def test_duplicates_ranks_the_paraphrase_first_with_reasons(client: FlaskClient) -> None:
    index(client, CORPUS)
    r = dup(client, {"ticket": QUERY, "limit": 3})
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert [c["key"] for c in body["candidates"]][0] == "HAD-1"
    assert len(body["candidates"]) == 3
    scores = [c["score"] for c in body["candidates"]]
    assert scores == sorted(scores, reverse=True)
    top = body["candidates"][0]
    assert top["summary"].startswith("NullPointerException") and top["status"] == "Resolved"
    assert any("getfilestatus" in reason for reason in top["reasons"])
    assert "same component" in top["reasons"]
    assert body["verdict"] in ("duplicate", "possible")
    assert body["mode"] == "offline" and "not configured" in body["mode_detail"]
    # An unrelated ticket gets no verdict.
    other = dup(client, {"ticket": {"summary": "Kerberos ticket renewal fails after 24 hours on secure clusters"}})
    assert other.get_json()["verdict"] == "none"


def test_the_verdict_is_the_configured_model_over_the_returned_features(client: FlaskClient) -> None:
    index(client, CORPUS)
    body = dup(client, {"ticket": QUERY, "limit": 5}).get_json()
    assert set(body["features"]) == set(FEATURES)
    model = load_config("config").verdict.model
    assert body["confidence"] == pytest.approx(model.probability(body["features"]), abs=2e-3)
    assert body["candidates"][0]["confidence"] == body["confidence"]
    assert all(c["confidence"] < body["confidence"] for c in body["candidates"][1:])  # runners-up: margin < 0
    # The leader's margin is over the runner-up even when only one candidate is asked for.
    one = dup(client, {"ticket": QUERY, "limit": 1}).get_json()
    assert len(one["candidates"]) == 1 and one["confidence"] == body["confidence"]
    assert one["features"] == body["features"] and one["verdict"] == body["verdict"]
    # With the shipped calibration the offline verdict stops at "possible": "duplicate" needs the LLM.
    assert body["verdict"] == "possible"


def test_time_and_field_filters(client: FlaskClient) -> None:
    index(client, CORPUS)
    body = dup(client, {"ticket": QUERY, "created_before": "2024-01-01T09:00:00Z"}).get_json()
    assert body["candidates"] == [] and body["searched"] == 0 and body["verdict"] == "none"
    body = dup(client, {"ticket": QUERY, "filters": {"status": ["Open", "In Progress"]}}).get_json()
    assert {c["key"] for c in body["candidates"]} == {"HAD-2", "HAD-5"}
    body = dup(client, {"ticket": QUERY, "filters": {"project": "DOC"}}).get_json()
    assert [c["key"] for c in body["candidates"]] == ["HAD-4"]
    body = dup(client, {"ticket": QUERY, "filters": {"created_after": "2024-01-04T00:00:00Z",
                                                     "exclude_keys": ["HAD-5"]}}).get_json()
    assert [c["key"] for c in body["candidates"]] == ["HAD-4"]
    # The query's own key is never its own duplicate.
    body = dup(client, {"ticket": dict(CORPUS[0])}).get_json()
    assert "HAD-1" not in [c["key"] for c in body["candidates"]]


def test_bad_input_is_a_400_naming_the_field(client: FlaskClient) -> None:
    r = dup(client, {"ticket": {"description": "no summary"}})
    assert r.status_code == 400 and r.mimetype == "application/problem+json"
    assert "summary" in r.get_json()["errors"]["ticket"]
    r = dup(client, {"ticket": {"summary": "   "}})
    assert r.status_code == 400 and "summary" in r.get_json()["errors"]["ticket"]
    r = dup(client, {"ticket": QUERY, "filters": {"assignee": "bob"}})
    assert r.status_code == 400 and "assignee" in r.get_json()["errors"]["filters"]
    r = client.post("/v1/tickets", json={"tickets": [{"key": "X-1"}]}, headers=auth("n8n"))
    assert r.status_code == 400 and "summary" in json.dumps(r.get_json()["errors"])
    r = dup(client, {"ticket": QUERY, "limit": 0})
    assert r.status_code == 400 and "limit" in r.get_json()["errors"]
    assert client.post("/v1/duplicates", json={"ticket": QUERY}).status_code == 401


def test_oversized_control_and_non_utf8_text_is_handled(client: FlaskClient) -> None:
    huge = "Disk full on DataNode while writing block. " * 40_000  # ~1.7 MB
    weird = "Null\u0000byte, bell\u0007, lone surrogate \ud800 and RTL\u202e text"
    res = index(client, [ticket("BIG-1", "DataNode disk full", huge), ticket("ODD-1", weird, weird)])
    assert res["indexed"] == 2
    raw = ('{"ticket": {"summary": "DataNode disk full \xff\xfe while writing", "description": "bad \xc3\x28 bytes"}}'
           ).encode("latin-1")
    r = client.post("/v1/duplicates", data=raw, content_type="application/json", headers=auth("n8n"))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["candidates"][0]["key"] == "BIG-1"
    odd = dup(client, {"ticket": {"summary": weird}}).get_json()
    assert odd["candidates"][0]["key"] == "ODD-1"
    assert "\u0000" not in odd["candidates"][0]["summary"]


def test_delete_removes_from_search(client: FlaskClient) -> None:
    index(client, CORPUS)
    assert client.delete("/v1/tickets/HAD-1", headers=auth("n8n")).status_code == 204
    body = dup(client, {"ticket": QUERY}).get_json()
    assert "HAD-1" not in [c["key"] for c in body["candidates"]]
    r = client.delete("/v1/tickets/HAD-1", headers=auth("n8n"))
    assert r.status_code == 404 and r.get_json()["code"] == "ticket_not_found"
    # Re-indexing brings it back without re-embedding (same content hash).
    assert index(client, [CORPUS[0]])["embedded"] == 0
    assert dup(client, {"ticket": QUERY}).get_json()["candidates"][0]["key"] == "HAD-1"


def test_similar_returns_resolved_tickets_with_resolutions(client: FlaskClient) -> None:
    index(client, CORPUS)
    r = client.post("/v1/similar", json={"ticket": QUERY, "limit": 5}, headers=auth("triage"))
    assert r.status_code == 200
    cands = r.get_json()["candidates"]
    assert cands[0]["key"] == "HAD-1"
    assert cands[0]["resolution"] == "Fixed" and "FileNotFoundException" in cands[0]["resolution_text"]
    assert cands[0]["components"] == ["fs"]
    keys = {c["key"] for c in cands}
    assert "HAD-3" not in keys  # resolved as Duplicate: no reusable fix
    assert keys <= {"HAD-1", "HAD-4"}  # unresolved tickets are not "similar resolved"


def test_idempotency_key_replays_the_first_answer(client: FlaskClient) -> None:
    index(client, CORPUS)
    body = {"ticket": {**QUERY, "key": "HAD-9"}, "idempotency_key": "delivery-123", "index": True}
    first = dup(client, body).get_json()
    assert first["replayed"] is False and first["indexed"] is True
    second = dup(client, body).get_json()
    assert second["replayed"] is True
    assert second["candidates"] == first["candidates"] and second["verdict"] == first["verdict"]
    # The ticket itself was indexed once.
    stats = client.get("/v1/index", headers=auth("n8n")).get_json()
    assert stats["tickets"] == len(CORPUS) + 1


def test_workers_stay_in_sync_through_the_change_counter(make_app: Callable[..., Flask], database_url: str) -> None:
    a, b = make_app().test_client(), make_app().test_client()
    index(a, CORPUS)
    assert dup(b, {"ticket": QUERY}).get_json()["candidates"][0]["key"] == "HAD-1"
    assert a.delete("/v1/tickets/HAD-1", headers=auth("n8n")).status_code == 204
    assert "HAD-1" not in [c["key"] for c in dup(b, {"ticket": QUERY}).get_json()["candidates"]]
    # The database emptied behind the workers' backs (restore, TRUNCATE): they notice and forget.
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE dedupe.tickets, dedupe.index_state")
    assert dup(b, {"ticket": QUERY}).get_json()["candidates"] == []
    index(a, CORPUS[:1])
    assert [c["key"] for c in dup(b, {"ticket": QUERY}).get_json()["candidates"]] == ["HAD-1"]


def test_model_that_fails_to_load_makes_readyz_and_search_say_so(make_app: Callable[..., Flask]) -> None:
    broken = make_app(embedder_factory=lambda: MiniLMEmbedder(MiniLMOptions(model_path="/nonexistent/model")))
    c = broken.test_client()
    ready = c.get("/readyz")
    assert ready.status_code == 503
    assert "cannot load the embedding model" in ready.get_json()["checks"]["model"]
    r = dup(c, {"ticket": QUERY})
    assert r.status_code == 503 and r.get_json()["code"] == "model_unavailable"
    r = c.post("/v1/tickets", json={"tickets": CORPUS[:1]}, headers=auth("n8n"))
    assert r.status_code == 503


def test_openapi_documents_the_endpoints(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    assert {"/v1/tickets", "/v1/tickets/{key}", "/v1/duplicates", "/v1/similar"} <= set(paths)
