"""Confluence REST (v2 pages / versions, v1 CQL search) and Salesforce REST (OAuth + SOQL) with `requests`."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import requests

from tests.fixtures.emulators import Emulators


def seed_pages(emu: Emulators, pages: list[dict[str, Any]]) -> list[str]:
    r = requests.post(emu.confluence_url + "/_emulator/confluence/pages", json={"pages": pages}, timeout=5)
    r.raise_for_status()
    return list(r.json()["ids"])


def test_confluence_page_and_version_paging(emu: Emulators) -> None:
    now = datetime.now(timezone.utc)
    [pid] = seed_pages(emu, [{"title": "Acme payroll configuration", "space": "CLIENTS", "versions": [
        {"body": f"<p>v{i}</p>", "created": (now - timedelta(days=10 - i)).isoformat(), "message": f"edit {i}"}
        for i in range(1, 6)]}])
    auth = (emu.jira_user, emu.jira_token)
    page = requests.get(f"{emu.confluence_url}/wiki/api/v2/pages/{pid}", params={"body-format": "storage"}, auth=auth, timeout=5).json()
    assert page["title"] == "Acme payroll configuration" and page["version"]["number"] == 5
    assert page["body"]["storage"] == {"representation": "storage", "value": "<p>v5</p>"}
    old = requests.get(f"{emu.confluence_url}/wiki/api/v2/pages/{pid}", params={"version": 2, "body-format": "storage"},
                       auth=auth, timeout=5).json()
    assert old["version"]["message"] == "edit 2" and old["body"]["storage"]["value"] == "<p>v2</p>"
    numbers: list[int] = []
    url: str | None = f"{emu.confluence_url}/wiki/api/v2/pages/{pid}/versions?limit=2"
    while url:
        body = requests.get(url, auth=auth, timeout=5).json()
        numbers += [v["number"] for v in body["results"]]
        nxt = body["_links"].get("next")
        url = emu.confluence_url + nxt if nxt else None
    assert numbers == [5, 4, 3, 2, 1]
    assert requests.get(f"{emu.confluence_url}/wiki/api/v2/pages/999", auth=auth, timeout=5).status_code == 404
    assert requests.get(f"{emu.confluence_url}/wiki/api/v2/pages/{pid}", timeout=5).status_code == 401


def test_confluence_cql_search(emu: Emulators) -> None:
    seed_pages(emu, [{"title": "Overtime rules", "space": "PAY", "body": "<p>Casual overtime after 38 hours</p>"},
                     {"title": "Leave accrual", "space": "PAY", "body": "<p>Annual leave accrues weekly</p>"},
                     {"title": "Acme config", "space": "CLIENTS", "body": "<p>Overtime: award default</p>", "labels": ["client-config"]}])
    auth = (emu.jira_user, emu.jira_token)

    def titles(cql: str) -> list[str]:
        r = requests.get(emu.confluence_url + "/wiki/rest/api/search", params={"cql": cql}, auth=auth, timeout=5)
        assert r.status_code == 200, r.text
        return sorted(x["title"] for x in r.json()["results"])

    assert titles('type = page AND text ~ "overtime"') == ["Acme config", "Overtime rules"]
    assert titles("space = PAY AND title ~ leave") == ["Leave accrual"]
    assert titles("label = client-config") == ["Acme config"]
    assert titles("lastmodified >= -1d") == ["Acme config", "Leave accrual", "Overtime rules"]
    bad = requests.get(emu.confluence_url + "/wiki/rest/api/search", params={"cql": "bogus = 1"}, auth=auth, timeout=5)
    assert bad.status_code == 400


def sf_token(emu: Emulators) -> str:
    r = requests.post(emu.salesforce_url + "/services/oauth2/token", timeout=5,
                      data={"grant_type": "client_credentials", "client_id": emu.salesforce_client_id,
                            "client_secret": emu.salesforce_client_secret})
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "Bearer" and body["instance_url"] == emu.salesforce_url
    return str(body["access_token"])


def test_salesforce_oauth_errors(emu: Emulators) -> None:
    bad = requests.post(emu.salesforce_url + "/services/oauth2/token", timeout=5,
                        data={"grant_type": "client_credentials", "client_id": emu.salesforce_client_id, "client_secret": "x"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_client"
    grant = requests.post(emu.salesforce_url + "/services/oauth2/token", data={"grant_type": "password"}, timeout=5)
    assert grant.json()["error"] == "unsupported_grant_type"
    r = requests.get(emu.salesforce_url + "/services/data/v62.0/query", params={"q": "SELECT Id FROM Account"},
                     headers={"Authorization": "Bearer nope"}, timeout=5)
    assert r.status_code == 401 and r.json()[0]["errorCode"] == "INVALID_SESSION_ID"


def test_soql_paging_and_filters(emu: Emulators) -> None:
    accounts = [{"Name": f"Client {i:03d}", "Industry": "Retail" if i % 3 else "Mining", "AnnualRevenue": i * 1000}
                for i in range(450)]
    ids = requests.post(emu.salesforce_url + "/_emulator/salesforce/records", json={"object": "Account", "records": accounts},
                        timeout=10).json()["ids"]
    requests.post(emu.salesforce_url + "/_emulator/salesforce/records", timeout=5, json={"object": "Case", "records": [
        {"Subject": "Payslip wrong", "Status": "New", "Priority": "High", "AccountId": ids[3], "IsEscalated": True},
        {"Subject": "Question", "Status": "Closed", "Priority": "Low", "AccountId": ids[4]}]}).raise_for_status()
    s = requests.Session()
    s.headers.update({"Authorization": f"Bearer {sf_token(emu)}", "Sforce-Query-Options": "batchSize=200"})
    base = emu.salesforce_url

    r = s.get(base + "/services/data/v62.0/query", params={"q": "SELECT Id, Name FROM Account ORDER BY Name"}, timeout=5).json()
    names = [x["Name"] for x in r["records"]]
    pages = 1
    assert r["totalSize"] == 450 and r["done"] is False and r["records"][0]["attributes"]["type"] == "Account"
    while not r["done"]:
        r = s.get(base + r["nextRecordsUrl"], timeout=5).json()
        names += [x["Name"] for x in r["records"]]
        pages += 1
    assert pages == 3 and names == sorted(names) and len(set(names)) == 450

    def q(soql: str) -> Any:
        resp = s.get(base + "/services/data/v62.0/query", params={"q": soql}, timeout=5)
        return resp.status_code, resp.json()

    _, mining = q("SELECT Name FROM Account WHERE Industry = 'mining' AND AnnualRevenue >= 300000 ORDER BY AnnualRevenue DESC LIMIT 3")
    assert [x["Name"] for x in mining["records"]] == ["Client 447", "Client 444", "Client 441"]
    _, like = q("SELECT Name FROM Account WHERE Name LIKE 'Client 00%' AND Industry IN ('Retail')")
    assert like["totalSize"] == 6
    _, cases = q("SELECT Subject, Account.Name FROM Case WHERE IsEscalated = true AND CreatedDate = LAST_N_DAYS:7")
    assert cases["records"][0]["Account"]["Name"] == "Client 003" and cases["totalSize"] == 1
    _, count = q("SELECT COUNT() FROM Case WHERE Status != 'Closed'")
    assert count["totalSize"] == 1 and count["records"] == []
    status, err = q("SELECT Id FROM Account WHERE")
    assert status == 400 and err[0]["errorCode"] == "MALFORMED_QUERY"
    status, err = q("SELECT Bogus FROM Account")
    assert status == 400 and err[0]["errorCode"] == "INVALID_FIELD"
    status, err = q("SELECT Id FROM Widget")
    assert status == 400 and err[0]["errorCode"] == "INVALID_TYPE"
