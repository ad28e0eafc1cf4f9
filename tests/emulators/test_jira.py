"""The Jira Cloud REST v3 emulator driven with plain `requests` (Basic auth), and its webhooks."""
from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.emulators.conftest import Receiver
from tests.fixtures.emulators import Emulators

FIXTURES = Path("/work/shared/data/fixtures")
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000$")


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


class Jira:
    def __init__(self, emu: Emulators) -> None:
        self.base = emu.jira_url
        self.s = requests.Session()
        self.s.auth = emu.jira_auth
        self.s.headers["Accept"] = "application/json"

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.s.get(self.base + path, timeout=10, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        return self.s.post(self.base + path, json=body, timeout=10, **kw)

    def put(self, path: str, body: Any) -> requests.Response:
        return self.s.put(self.base + path, json=body, timeout=10)

    def search(self, jql: str, **body: Any) -> requests.Response:
        return self.post("/rest/api/3/search/jql", {"jql": jql, **body})


@pytest.fixture
def jira(emu: Emulators) -> Jira:
    return Jira(emu)


def iso(days_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days_ago)).isoformat()


def test_auth_is_required(emu: Emulators) -> None:
    emu.jira_seed([{"project": "SUP", "summary": "x"}])
    assert requests.get(emu.jira_url + "/rest/api/3/issue/SUP-1", timeout=5).status_code == 401
    bad = requests.get(emu.jira_url + "/rest/api/3/issue/SUP-1", auth=(emu.jira_user, "wrong"), timeout=5)
    assert bad.status_code == 401 and bad.json()["errorMessages"]


def test_get_issue_has_v3_shape(emu: Emulators, jira: Jira) -> None:
    emu.jira_seed([{"key": "SUP-7", "summary": "Payslip shows negative leave", "description": "Balance is -3 days.",
                    "priority": "High", "issuetype": "Bug", "labels": ["leave"], "components": ["Payslips"],
                    "client": "Northwind Health", "created": iso(3), "comments": ["First look: config issue."]}])
    r = jira.get("/rest/api/3/issue/SUP-7")
    assert r.status_code == 200
    issue = r.json()
    assert issue["key"] == "SUP-7" and issue["self"].endswith(f"/rest/api/3/issue/{issue['id']}")
    f = issue["fields"]
    assert f["summary"] == "Payslip shows negative leave"
    assert f["description"]["type"] == "doc" and f["description"]["content"][0]["content"][0]["text"] == "Balance is -3 days."
    assert f["status"]["name"] == "To Do" and f["status"]["statusCategory"]["key"] == "new"
    assert f["priority"]["name"] == "High" and f["issuetype"]["name"] == "Bug" and f["project"]["key"] == "SUP"
    assert f["labels"] == ["leave"] and f["components"][0]["name"] == "Payslips"
    assert TS.match(f["created"]) and TS.match(f["updated"]) and f["resolution"] is None
    assert f["customfield_10100"] == {"value": "Northwind Health"}
    assert f["comment"]["total"] == 1 and f["comment"]["comments"][0]["body"]["type"] == "doc"
    # the keys the real example carries are all present
    assert {"id", "key", "self", "fields"} <= set(issue) and set(fixture("jira-rest-v3/get_issue_response.json")) <= set(issue)
    only = jira.get("/rest/api/3/issue/SUP-7", params={"fields": "summary,status"}).json()["fields"]
    assert set(only) == {"summary", "status"}
    assert jira.get("/rest/api/3/issue/SUP-99").status_code == 404


def test_create_issue_and_field_errors(jira: Jira, emu: Emulators) -> None:
    adf = {"type": "doc", "version": 1, "content": [{"type": "paragraph", "content": [{"type": "text", "text": "Pay run failed"}]}]}
    r = jira.post("/rest/api/3/issue", {"fields": {"project": {"key": "SUP"}, "summary": "Pay run failed",
                                                   "issuetype": {"name": "Bug"}, "description": adf,
                                                   "priority": {"name": "Blocker"}, "labels": ["payrun"]}})
    assert r.status_code == 201 and r.json()["key"] == "SUP-1"
    got = jira.get("/rest/api/3/issue/SUP-1").json()["fields"]
    assert got["priority"]["name"] == "Blocker" and got["description"] == adf
    cases = [
        ({"project": {"key": "SUP"}, "issuetype": {"name": "Bug"}}, "summary"),
        ({"project": {"key": "NOPE"}, "summary": "x", "issuetype": {"name": "Bug"}}, "project"),
        ({"project": {"key": "SUP"}, "summary": "x", "issuetype": {"name": "Bug"}, "description": "plain text"}, "description"),
        ({"project": {"key": "SUP"}, "summary": "x", "issuetype": {"name": "Bug"}, "labels": ["has space"]}, "labels"),
        ({"project": {"key": "SUP"}, "summary": "x", "issuetype": {"name": "Bug"}, "bogus": 1}, "bogus"),
        ({"project": {"key": "SUP"}, "summary": "x", "issuetype": {"name": "Nope"}}, "issuetype"),
    ]
    for fields, bad in cases:
        r = jira.post("/rest/api/3/issue", {"fields": fields})
        assert r.status_code == 400 and bad in r.json()["errors"], (fields, r.text)
    assert set(emu.jira_state()["issues"]) == {"SUP-1"}  # nothing half-written


def test_jql_paging_with_next_page_token(emu: Emulators, jira: Jira) -> None:
    emu.jira_seed([{"project": "PAY", "summary": f"Ticket {i}", "created": iso(200 - i)} for i in range(120)])
    keys: list[str] = []
    token = None
    pages = 0
    while True:
        body: dict[str, Any] = {"fields": ["summary"], "maxResults": 50}
        if token:
            body["nextPageToken"] = token
        page = jira.search("project = PAY ORDER BY created ASC", **body).json()
        pages += 1
        keys += [i["key"] for i in page["issues"]]
        token = page.get("nextPageToken")
        if page["isLast"]:
            assert token is None
            break
        assert token
    assert pages == 3 and len(keys) == 120 and len(set(keys)) == 120
    assert keys[:3] == ["PAY-1", "PAY-2", "PAY-3"] and keys[-1] == "PAY-120"
    via_get = jira.get("/rest/api/3/search/jql", params={"jql": "project = PAY", "maxResults": 5, "fields": "summary"}).json()
    assert len(via_get["issues"]) == 5 and via_get["issues"][0]["key"] == "PAY-120"  # default order: newest first
    ids_only = jira.search("project = PAY").json()
    assert set(ids_only["issues"][0]) == {"id"}  # search/jql returns ids unless fields are requested
    bad = jira.search("project = PAY", nextPageToken="garbage")
    assert bad.status_code == 400 and bad.json()["errorMessages"]


def test_jql_operators(emu: Emulators, jira: Jira) -> None:
    emu.jira_seed([
        {"key": "SUP-1", "summary": "Overtime not applied for casuals", "priority": "Blocker", "labels": ["overtime"],
         "created": iso(1), "assignee": "ana@example.com"},
        {"key": "SUP-2", "summary": "Payslip layout broken", "priority": "Low", "created": iso(10), "updated": iso(9),
         "status": "In Progress", "components": ["Payslips"]},
        {"key": "SUP-3", "summary": "Overtime rounding", "priority": "High", "created": iso(20), "status": "Done",
         "labels": ["overtime", "rounding"], "assignee": "bo@example.com"},
        {"key": "OPS-1", "summary": "Backup job slow", "priority": "Medium", "created": iso(400)},
    ])

    def keys(jql: str) -> list[str]:
        r = jira.search(jql, fields=["key"], maxResults=100)
        assert r.status_code == 200, r.text
        return sorted(i["key"] for i in r.json()["issues"])

    assert keys("project = SUP") == ["SUP-1", "SUP-2", "SUP-3"]
    assert keys("priority in (Blocker, High)") == ["SUP-1", "SUP-3"]
    assert keys("priority not in (Blocker, High)") == ["OPS-1", "SUP-2"]
    assert keys('summary ~ "overtime"') == ["SUP-1", "SUP-3"]
    assert keys("text ~ payslip") == ["SUP-2"]
    assert keys("created >= -2d") == ["SUP-1"]
    assert keys("created < -100d") == ["OPS-1"]
    assert keys(f'created > "{(datetime.now(timezone.utc) - timedelta(days=15)).strftime("%Y-%m-%d")}"') == ["SUP-1", "SUP-2"]
    assert keys("updated <= -5d AND project = SUP") == ["SUP-2", "SUP-3"]
    assert keys("assignee is EMPTY") == ["OPS-1", "SUP-2"]
    assert keys('assignee != "ana@example.com"') == ["SUP-3"]  # != never matches an empty field, as in Jira
    assert keys("resolution is not EMPTY") == ["SUP-3"]
    assert keys("statusCategory != Done AND (labels = overtime OR component = Payslips)") == ["SUP-1", "SUP-2"]
    assert keys("NOT project = SUP") == ["OPS-1"]
    ordered = jira.search("project = SUP ORDER BY priority DESC", fields=["key"]).json()["issues"]
    assert [i["key"] for i in ordered] == ["SUP-1", "SUP-3", "SUP-2"]
    for bad in ("project = ", "project == SUP", "foo = bar", "project = NOPE", "(project = SUP", "created > yesterdayish"):
        r = jira.search(bad)
        assert r.status_code == 400, bad
        assert r.json()["errorMessages"] and r.json()["errors"] == {}, bad
    gone = jira.get("/rest/api/3/search", params={"jql": "project = SUP"})
    assert gone.status_code == 410 and gone.json() == fixture("jira-rest-v3/search_legacy_410_gone.quoted.json")


def test_adf_comments(emu: Emulators, jira: Jira) -> None:
    emu.jira_seed([{"key": "SUP-1", "summary": "x", "updated": iso(5)}])
    request_body = fixture("jira-rest-v3/add_comment_request_adf.json")
    r = jira.post("/rest/api/3/issue/SUP-1/comment", request_body)
    assert r.status_code == 201
    created = r.json()
    sample = fixture("jira-rest-v3/add_comment_response_201.json")
    assert set(sample) <= set(created)
    assert created["body"] == request_body["body"] and created["visibility"] == request_body["visibility"]
    listed = jira.get("/rest/api/3/issue/SUP-1/comment").json()
    assert listed["total"] == 1 and listed["comments"][0]["id"] == created["id"]
    assert jira.get("/rest/api/3/issue/SUP-1").json()["fields"]["updated"][:10] == datetime.now(timezone.utc).strftime("%Y-%m-%d")
    for bad in ({"body": "plain string"}, {"body": {"type": "doc", "version": 1, "content": []}}, {}):
        assert jira.post("/rest/api/3/issue/SUP-1/comment", bad).status_code == 400
    assert len(emu.jira_state()["comments"]["SUP-1"]) == 1


def test_labels_add_remove_and_set(emu: Emulators, jira: Jira) -> None:
    emu.jira_seed([{"key": "SUP-1", "summary": "x", "labels": ["a", "b"]}])
    assert jira.put("/rest/api/3/issue/SUP-1", {"update": {"labels": [{"add": "triaged"}, {"remove": "a"}]}}).status_code == 204
    assert jira.get("/rest/api/3/issue/SUP-1").json()["fields"]["labels"] == ["b", "triaged"]
    assert jira.put("/rest/api/3/issue/SUP-1", {"fields": {"labels": ["only"]}}).status_code == 204
    assert jira.get("/rest/api/3/issue/SUP-1").json()["fields"]["labels"] == ["only"]
    bad = jira.put("/rest/api/3/issue/SUP-1", {"update": {"labels": [{"add": "two words"}]}})
    assert bad.status_code == 400 and "labels" in bad.json()["errors"]
    assert jira.put("/rest/api/3/issue/SUP-1", {"fields": {"status": "Done"}}).status_code == 400
    history = jira.get("/rest/api/3/issue/SUP-1", params={"expand": "changelog"}).json()["changelog"]["histories"]
    assert [h["items"][0]["field"] for h in history] == ["labels", "labels"]


def test_issue_links(emu: Emulators, jira: Jira) -> None:
    emu.jira_seed([{"key": "HSP-1", "summary": "new report"}, {"key": "MKY-1", "summary": "original"}])
    types = jira.get("/rest/api/3/issueLinkType").json()["issueLinkTypes"]
    dup = next(t for t in types if t["name"] == "Duplicate")
    assert dup["outward"] == "duplicates" and dup["inward"] == "is duplicated by"
    body = fixture("jira-rest-v3/issuelink_duplicate_request.json")
    r = jira.post("/rest/api/3/issueLink", body)
    assert r.status_code == 201 and r.text == ""
    src = jira.get("/rest/api/3/issue/HSP-1").json()["fields"]["issuelinks"]
    dst = jira.get("/rest/api/3/issue/MKY-1").json()["fields"]["issuelinks"]
    assert src[0]["type"]["name"] == "Duplicate" and src[0]["outwardIssue"]["key"] == "MKY-1"  # HSP-1 duplicates MKY-1
    assert dst[0]["inwardIssue"]["key"] == "HSP-1"  # MKY-1 is duplicated by HSP-1
    assert emu.jira_state()["comments"]["HSP-1"][0]["text"] == "Linked related issue!"
    hits = jira.search('issueLinkType = "is duplicated by"', fields=["key"]).json()["issues"]
    assert [i["key"] for i in hits] == ["MKY-1"]
    assert jira.post("/rest/api/3/issueLink", {**body, "type": {"name": "Nope"}}).status_code == 404
    assert jira.post("/rest/api/3/issueLink", {**body, "outwardIssue": {"key": "MKY-9"}}).status_code == 404


def test_transitions(emu: Emulators, jira: Jira) -> None:
    emu.jira_seed([{"key": "SUP-1", "summary": "x"}])
    ts = jira.get("/rest/api/3/issue/SUP-1/transitions").json()["transitions"]
    names = {t["name"]: t["id"] for t in ts}
    assert "To Do" not in names and {"In Progress", "Done"} <= set(names)
    assert jira.post("/rest/api/3/issue/SUP-1/transitions", {"transition": {"id": names["Done"]}}).status_code == 204
    f = jira.get("/rest/api/3/issue/SUP-1").json()["fields"]
    assert f["status"]["name"] == "Done" and f["status"]["statusCategory"]["key"] == "done"
    assert f["resolution"]["name"] == "Done" and TS.match(f["resolutiondate"])
    again = jira.post("/rest/api/3/issue/SUP-1/transitions", {"transition": {"id": names["Done"]}})
    assert again.status_code == 400 and again.json()["errorMessages"]
    assert jira.post("/rest/api/3/issue/SUP-1/transitions", {"transition": {"id": "999"}}).status_code == 400
    assert jira.post("/rest/api/3/issue/SUP-1/transitions", {}).status_code == 400
    reopened = jira.post("/rest/api/3/issue/SUP-1/transitions", {"transition": {"id": "11"}})
    assert reopened.status_code == 204 and jira.get("/rest/api/3/issue/SUP-1").json()["fields"]["resolution"] is None


def test_fault_injection(emu: Emulators, jira: Jira) -> None:
    emu.jira_seed([{"key": "SUP-1", "summary": "x"}])
    emu.jira_fault("/rest/api/3/issue/*", status=429, count=2, retry_after="3")
    for _ in range(2):
        r = jira.get("/rest/api/3/issue/SUP-1")
        assert r.status_code == 429 and r.headers["Retry-After"] == "3" and "X-RateLimit-Reset" in r.headers
    assert jira.get("/rest/api/3/issue/SUP-1").status_code == 200
    emu.jira_fault("/rest/api/3/search/jql", status=503, retry_after="1", method="POST")
    assert jira.search("project = SUP").status_code == 503
    emu.jira_fault("/rest/api/3/issue/*", down=True)
    with pytest.raises(requests.ConnectionError):
        jira.get("/rest/api/3/issue/SUP-1")
    assert jira.get("/rest/api/3/issue/SUP-1").status_code == 200


# ------------------------------------------------------------------ webhooks

def _verify(secret: str, req: dict[str, Any]) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), req["raw"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, req["headers"]["X-Hub-Signature"])


def test_webhook_created_is_signed_and_real_shaped(emu: Emulators, jira: Jira, receiver: Receiver) -> None:
    emu.jira_register_webhook(receiver.url, events=["jira:issue_created"])
    r = jira.post("/rest/api/3/issue", {"fields": {"project": {"key": "SUP"}, "summary": "Pay run failed",
                                                   "issuetype": {"name": "Bug"}}})
    assert r.status_code == 201
    assert len(receiver.requests) == 1  # delivered synchronously
    req = receiver.requests[0]
    assert _verify(emu.jira_webhook_secret, req)
    assert not _verify("another-secret", req)
    assert req["headers"]["X-Atlassian-Webhook-Identifier"] and req["headers"]["X-Atlassian-Webhook-Flow"] == "Primary"
    body = json.loads(req["raw"])
    sample = fixture("jira-webhooks/mattermost_jira_issue_created.json")
    assert set(body) == set(sample)
    assert body["webhookEvent"] == "jira:issue_created" and body["issue_event_type_name"] == "issue_created"
    assert body["issue"]["key"] == "SUP-1" and "/rest/api/2/" in body["issue"]["self"]
    assert {"summary", "status", "priority", "issuetype", "project", "created"} <= set(body["issue"]["fields"])
    assert isinstance(body["timestamp"], int) and body["user"]["accountId"]


def test_comment_webhooks_and_redelivery(emu: Emulators, jira: Jira, receiver: Receiver) -> None:
    emu.jira_seed([{"key": "SUP-1", "summary": "x"}])
    emu.jira_register_webhook(receiver.url, events=["comment_created", "jira:issue_updated"])
    adf = {"type": "doc", "version": 1, "content": [{"type": "paragraph", "content": [{"type": "text", "text": "Looking"}]}]}
    assert jira.post("/rest/api/3/issue/SUP-1/comment", {"body": adf}).status_code == 201
    events = [json.loads(r["raw"]) for r in receiver.requests]
    assert [e["webhookEvent"] for e in events] == ["comment_created", "jira:issue_updated"]
    sample = fixture("jira-webhooks/mattermost_comment_created.json")
    assert set(events[0]) == set(sample) and set(events[0]["comment"]) >= {"id", "author", "body", "created"}
    assert events[0]["comment"]["body"] == "Looking"  # webhooks carry plain text, not ADF
    assert events[1]["issue_event_type_name"] == "issue_commented" and events[1]["comment"]["id"] == events[0]["comment"]["id"]
    first = receiver.requests[0]
    state = emu.jira_state()
    ident = first["headers"]["X-Atlassian-Webhook-Identifier"]
    requests.post(emu.jira_url + "/_emulator/jira/webhooks/redeliver", json={"identifier": ident}, timeout=5).raise_for_status()
    again = receiver.requests[-1]
    assert again["headers"]["X-Atlassian-Webhook-Identifier"] == ident and again["raw"] == first["raw"]
    assert again["headers"]["X-Atlassian-Webhook-Retry"] == "1" and _verify(emu.jira_webhook_secret, again)
    assert all(d["status"] == "delivered" for d in state["deliveries"])


def test_webhook_retries_failed_delivery(emu: Emulators, jira: Jira, receiver: Receiver) -> None:
    receiver.statuses = [500]
    requests.post(emu.jira_url + "/_emulator/jira/webhooks", json={"url": receiver.url, "retry_delays": [0.05],
                                                                   "secret": "s3cret"}, timeout=5).raise_for_status()
    emu.jira_seed([{"key": "SUP-1", "summary": "x"}], fire_webhooks=True)
    final = emu.wait_for(emu.jira_state, lambda s: s["deliveries"] and s["deliveries"][0]["status"] == "delivered", timeout=5)
    d = final["deliveries"][0]
    assert [a["status"] for a in d["attempts"]] == [500, 200] and d["attempts"][1]["retry"] == 1
    ids = {r["headers"]["X-Atlassian-Webhook-Identifier"] for r in receiver.requests}
    assert len(ids) == 1 and all(_verify("s3cret", r) for r in receiver.requests)


def test_webhook_jql_filter_and_async(emu: Emulators, jira: Jira, receiver: Receiver) -> None:
    emu.jira_register_webhook(receiver.url, events=["jira:issue_created"], jql="project = OPS", asynchronous=True)
    emu.jira_seed([{"project": "SUP", "summary": "ignored"}, {"project": "OPS", "summary": "wanted"}], fire_webhooks=True)
    emu.wait_for(lambda: len(receiver.requests), lambda n: n >= 1, timeout=5)
    body = json.loads(receiver.requests[0]["raw"])
    assert body["issue"]["key"] == "OPS-1" and len(receiver.requests) == 1
    transition = jira.post("/rest/api/3/issue/OPS-1/transitions", {"transition": {"id": "31"}})
    assert transition.status_code == 204 and len(receiver.requests) == 1  # not subscribed to issue_updated
