"""The digest API end to end inside the service: emulated Jira / Salesforce / Confluence, real PostgreSQL."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from tests.conftest import auth

from .conftest import ago, fault, seed_confluence, seed_salesforce

NOW = datetime.now(timezone.utc)


def _seed_defects(emu) -> None:
    emu.jira_seed([
        {"key": "PAY-1", "summary": "Payslip PDF blank for salaried staff", "issuetype": "Bug", "priority": "High",
         "client": "acme", "created": ago(20), "updated": ago(5), "fields": {"customfield_10102": 2}},
        {"key": "PAY-2", "summary": "Holiday accrual rounding", "issuetype": "Bug", "priority": "Low",
         "client": "globex", "created": ago(3), "updated": ago(2)},
        {"key": "PAY-3", "summary": "Pay run stuck in 'approving'", "issuetype": "Bug", "priority": "Blocker",
         "client": "initech", "created": ago(1), "updated": ago(0.1)},
        {"key": "PAY-4", "summary": "Overtime export <b>broken</b> <!channel>", "issuetype": "Bug",
         "priority": "Medium", "client": "acme", "created": ago(4), "updated": ago(1),
         "links": [{"type": "Blocks", "inward": "PAY-3"}]},
        {"key": "PAY-5", "summary": "Leave balance wrong after import", "issuetype": "Bug", "priority": "Medium",
         "client": "globex", "status": "Waiting for Customer", "created": ago(12), "updated": ago(8)},
        {"key": "PAY-6", "summary": "Old fixed bug", "issuetype": "Bug", "priority": "High", "client": "acme",
         "status": "Done", "created": ago(40), "updated": ago(30)},
        {"key": "PAY-7", "summary": "Flagged tax code issue", "issuetype": "Bug", "priority": "Medium",
         "client": "globex", "flagged": True, "created": ago(2), "updated": ago(1)},
        {"key": "SUP-1", "summary": "Payslip PDF is blank", "issuetype": "Bug", "priority": "Low",
         "client": "globex", "created": ago(2), "updated": ago(2),
         "links": [{"type": "Duplicate", "outward": "PAY-1"}]},
    ])


def _rows(database_url: str, sql: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql).fetchall()


def test_monitor_finds_stale_blocked_waiting_with_reasons_and_archives(client, emu, database_url):
    _seed_defects(emu)
    r = client.post("/v1/monitor", json={"run_id": "run-mon-1"}, headers=auth())
    assert r.status_code == 201, r.get_json()
    d = r.get_json()
    assert d["kind"] == "monitor" and d["complete"] is True
    found = {f["key"]: {x["rule"] for x in f["reasons"]} for f in d["data"]["findings"]}
    assert found == {"PAY-1": {"stale"}, "PAY-3": {"blocker"}, "PAY-4": {"blocked"}, "PAY-5": {"stale", "waiting"},
                     "PAY-7": {"flagged"}}
    assert d["data"]["scanned"] == 7  # open bugs only: the configured JQL excludes Done
    assert d["narrative"]["mode"] == "offline" and "offline" in d["narrative"]["note"]
    text = str(d["slack"])
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text
    assert "PAY-3" in d["email"]["html"] and "&lt;b&gt;broken&lt;/b&gt;" in d["email"]["html"]
    assert d["markdown"].startswith("# Defect monitor")
    # Archived and retrievable exactly as delivered; a retry of the same run returns the same digest.
    got = client.get(f"/v1/digests/{d['id']}", headers=auth()).get_json()
    assert got["slack"] == d["slack"] and got["email"] == d["email"] and got["data"] == d["data"]
    again = client.post("/v1/monitor", json={"run_id": "run-mon-1"}, headers=auth()).get_json()
    assert again["id"] == d["id"]
    listed = client.get("/v1/digests?kind=monitor", headers=auth()).get_json()["digests"]
    assert [x["id"] for x in listed] == [d["id"]]
    assert _rows(database_url, "SELECT count(*) FROM digest.digests")[0][0] == 1


def test_monitor_rules_and_jql_come_from_the_request(client, emu):
    _seed_defects(emu)
    r = client.post("/v1/monitor", json={"jql": "project = PAY AND client = globex AND statusCategory != Done",
                                         "rules": {"stale_days": {"Low": 1}, "waiting_days": 30}},
                    headers=auth())
    assert r.status_code == 201, r.get_json()
    found = {f["key"]: [x["rule"] for x in f["reasons"]] for f in r.get_json()["data"]["findings"]}
    assert found == {"PAY-2": ["stale"], "PAY-5": ["stale"], "PAY-7": ["flagged"]}
    assert r.get_json()["params"]["jql"].startswith("project = PAY AND client = globex")


def test_bad_input_fails_loudly_and_archives_nothing(client, emu, database_url):
    _seed_defects(emu)
    r = client.post("/v1/monitor", json={"jql": "project = PAY AND (status = "}, headers=auth())
    assert r.status_code == 400 and r.content_type == "application/problem+json"
    body = r.get_json()
    assert body["code"] == "invalid_query" and body["field"] == "jql" and "JQL" in body["detail"]
    r = client.post("/v1/monitor", json={"rules": {"stale_days": {"High": "soon"}}}, headers=auth())
    assert r.status_code == 400 and "rules" in r.get_json()["errors"]
    r = client.post("/v1/digests", json={"limit": 0, "surprise": True}, headers=auth())
    assert r.status_code == 400 and set(r.get_json()["errors"]) == {"limit", "surprise"}
    r = client.post("/v1/monitor", json={}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert client.get("/v1/digests/not-a-uuid", headers=auth()).status_code == 404
    # Jira down (connection dropped on every call): 502, after the connector's bounded retries.
    emu.jira_fault("/rest/api/3/search/jql", down=True, count=None)
    r = client.post("/v1/monitor", json={}, headers=auth())
    assert r.status_code == 502 and r.get_json()["code"] == "source_unavailable"
    assert r.get_json()["source"] == "jira"
    assert _rows(database_url, "SELECT count(*) FROM digest.digests")[0][0] == 0


def test_weekly_digest_scores_with_salesforce_value_and_shows_parts(client, emu):
    _seed_defects(emu)
    seed_salesforce(emu, "Account", [
        {"Name": "Acme Corp", "AnnualRevenue": 2_000_000, "Metis_Client_Key__c": "acme"},
        {"Name": "Globex", "AnnualRevenue": 500_000, "Metis_Client_Key__c": "globex"},
        {"Name": "Initech", "AnnualRevenue": 100_000, "Metis_Client_Key__c": "initech"}])
    r = client.post("/v1/digests", json={"limit": 3}, headers=auth())
    assert r.status_code == 201, r.get_json()
    d = r.get_json()
    tickets = d["data"]["tickets"]
    assert len(tickets) == 3 and d["data"]["open"] == 7
    assert [t["score"] for t in tickets] == sorted((t["score"] for t in tickets), reverse=True)
    pay1 = next(t for t in tickets if t["key"] == "PAY-1")
    parts = {p["name"]: p for p in pay1["parts"]}
    # PAY-1 is duplicated by SUP-1 (globex): two clients, whose value is summed against the largest account.
    assert pay1["clients_affected"] == ["acme", "globex"] and parts["duplicates"]["value"] == 1
    assert parts["customer_value"]["value"] == 2_500_000 and parts["customer_value"]["normalized"] == 1.0
    assert parts["reopenings"]["value"] == 2
    assert pay1["score"] == pytest.approx(sum(p["points"] for p in pay1["parts"]), abs=0.05)
    # No run: the narrative comes from the template, and every rendering says so.
    assert d["narrative"]["mode"] == "offline" and "no run id" in d["narrative"]["reason"]
    for rendering in (str(d["slack"]), d["email"]["html"], d["email"]["text"], d["markdown"]):
        assert "offline template" in rendering
    assert "parts: priority" in d["markdown"]


def test_weekly_fails_when_salesforce_is_unreachable(client, emu, database_url):
    _seed_defects(emu)
    fault(emu.salesforce_url, "salesforce", {"path": "/services/oauth2/token", "status": 503, "count": None})
    r = client.post("/v1/digests", json={}, headers=auth())
    assert r.status_code == 502 and r.get_json()["source"] == "salesforce"
    assert _rows(database_url, "SELECT count(*) FROM digest.digests")[0][0] == 0


def test_health_scores_with_history_trend_and_gauges(client, emu, database_url):
    _seed_defects(emu)
    pages = seed_confluence(emu, [
        {"title": "Acme configuration", "space": "CFG", "versions": [{"body": "v1", "created": ago(60)},
                                                                     {"body": "typo", "created": ago(1),
                                                                      "minor": True}]},
        {"title": "Globex configuration", "space": "CFG", "versions": [{"body": "v1", "created": ago(3)}]}])
    seed_salesforce(emu, "Account", [
        {"Id": "001000000000001AAA", "Name": "Acme Corp", "AnnualRevenue": 2_000_000, "Metis_Client_Key__c": "acme",
         "Renewal_Date__c": (NOW + timedelta(days=30)).date().isoformat(), "Config_Doc_Page_Id__c": pages[0],
         "Config_Last_Changed__c": ago(10)},
        {"Id": "001000000000002AAA", "Name": "Globex", "AnnualRevenue": 500_000, "Metis_Client_Key__c": "globex",
         "Renewal_Date__c": (NOW + timedelta(days=400)).date().isoformat(), "Config_Doc_Page_Id__c": pages[1],
         "Config_Last_Changed__c": ago(10)},
        {"Id": "001000000000003AAA", "Name": "Umbrella", "Metis_Client_Key__c": "umbrella",
         "Config_Doc_Page_Id__c": "424242"}])
    seed_salesforce(emu, "Case", [
        {"AccountId": "001000000000001AAA", "Subject": "Payslips", "Status": "New", "IsEscalated": True},
        {"AccountId": "001000000000001AAA", "Subject": "Login", "Status": "Working"},
        {"AccountId": "001000000000002AAA", "Subject": "Old", "Status": "Closed"}])
    first = client.post("/v1/health-scores", json={"now": (NOW - timedelta(days=1)).isoformat()}, headers=auth())
    assert first.status_code == 201, first.get_json()
    r = client.post("/v1/health-scores", json={}, headers=auth())
    assert r.status_code == 201, r.get_json()
    clients = {c["client"]: c for c in r.get_json()["data"]["clients"]}
    assert set(clients) == {"acme", "globex", "initech", "umbrella"}
    acme = {c["name"]: c for c in clients["acme"]["components"]}
    # The minor edit yesterday does not count: the last real edit predates the configuration change.
    assert acme["documentation"]["score"] == 0 and "out of date" in acme["documentation"]["explanation"]
    assert acme["open_cases"]["value"] == 2 and acme["escalated_cases"]["value"] == 1
    assert acme["renewal"]["score"] == pytest.approx(100 * 30 / 180, abs=1.5)
    assert {c["name"]: c for c in clients["globex"]["components"]}["documentation"]["score"] == 100
    umbrella = {c["name"]: c for c in clients["umbrella"]["components"]}
    assert umbrella["documentation"]["score"] == 0 and "does not exist" in umbrella["documentation"]["explanation"]
    assert not {c["name"]: c for c in clients["initech"]["components"]}["open_cases"]["available"]
    # A day later the renewal is closer and the defects older: a little lower, and the change is shown.
    acme_now, acme_before = clients["acme"]["score"], clients["acme"]["previous_score"]
    assert acme_before > acme_now and clients["acme"]["delta"] == round(acme_now - acme_before, 1)
    # History and trend through the read API.
    h = client.get("/v1/health-scores?client=acme", headers=auth()).get_json()["clients"][0]
    assert len(h["history"]) == 2 and h["delta"] == clients["acme"]["delta"] and h["score"] == acme_now
    assert [p["score"] for p in h["history"]] == [acme_now, acme_before]
    assert client.get("/v1/health-scores?client=nobody", headers=auth()).status_code == 404
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'metis_digest_client_health_score{{client="acme"}} {clients["acme"]["score"]}' in metrics
    assert 'metis_digest_client_health_component_score{client="acme",component="documentation"} 0.0' in metrics
    assert _rows(database_url, "SELECT count(*) FROM digest.health_scores")[0][0] == 8


def test_health_fails_when_confluence_errors(client, emu, database_url):
    _seed_defects(emu)
    (pid,) = seed_confluence(emu, [{"title": "Acme configuration", "body": "x"}])
    seed_salesforce(emu, "Account", [{"Name": "Acme", "Metis_Client_Key__c": "acme", "Config_Doc_Page_Id__c": pid}])
    fault(emu.confluence_url, "confluence", {"path": "/wiki/api/v2/pages/*", "status": 500, "count": None})
    r = client.post("/v1/health-scores", json={}, headers=auth())
    assert r.status_code == 502 and r.get_json()["source"] == "confluence"
    assert _rows(database_url, "SELECT count(*) FROM digest.health_scores")[0][0] == 0


def test_patterns_cluster_across_clients_with_trend(client, emu):
    similar = ["Payslip PDF shows blank page after pay run", "Blank payslip PDF generated after the pay run",
               "Payslip PDF is empty when the pay run completes", "After pay run the payslip PDF comes out blank"]
    issues = [{"key": f"SUP-{i + 1}", "summary": s, "issuetype": "Bug", "client": c, "created": ago(1 + i),
               "components": ["Payslips"]}
              for i, (s, c) in enumerate(zip(similar, ["acme", "globex", "initech", "acme"]))]
    issues += [{"key": "SUP-20", "summary": "Blank payslip PDF after running payroll", "issuetype": "Bug",
                "client": "acme", "created": ago(10)}]
    issues += [{"key": f"SUP-{30 + i}", "summary": s, "issuetype": "Bug", "client": "acme", "created": ago(2)}
               for i, s in enumerate(["SSO login times out", "Cannot log in with SSO, timeout",
                                      "SSO sign-in timeout error"])]
    issues += [{"key": "SUP-40", "summary": "Rostering grid colours wrong", "issuetype": "Bug", "client": "globex",
                "created": ago(3)}]
    emu.jira_seed(issues)
    r = client.post("/v1/patterns", json={"rules": {"window_days": 7, "min_tickets": 3, "similarity": 0.6}},
                    headers=auth())
    assert r.status_code == 201, r.get_json()
    d = r.get_json()["data"]
    assert d["scanned"] == {"current": 8, "previous": 1, "read": 9}
    assert len(d["patterns"]) == 1  # the SSO cluster is single-client
    p = d["patterns"][0]
    assert {t["key"] for t in p["tickets"]} == {"SUP-1", "SUP-2", "SUP-3", "SUP-4"}
    assert [c["client"] for c in p["clients"]] == ["acme", "globex", "initech"]
    assert p["clients"][0]["tickets"] == 2
    assert p["previous_count"] == 1 and p["trend"] == "rising" and p["components"] == ["Payslips"]
    assert d["embedded"] == {"new": 9, "cached": 0}
    again = client.post("/v1/patterns", json={"rules": {"window_days": 7, "min_tickets": 3, "similarity": 0.6}},
                        headers=auth()).get_json()["data"]
    assert again["embedded"] == {"new": 0, "cached": 9}  # unchanged tickets are never embedded twice
    assert again["patterns"][0]["tickets"] == p["tickets"]


def test_openapi_describes_every_job(client):
    spec = client.get("/openapi.json").get_json()
    for path in ("/v1/monitor", "/v1/digests", "/v1/patterns", "/v1/health-scores"):
        assert "post" in spec["paths"][path], path
    assert "get" in spec["paths"]["/v1/digests/{digest_id}"] and "get" in spec["paths"]["/v1/health-scores"]
    body = spec["paths"]["/v1/digests"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body  # generated from WeeklyCreate
