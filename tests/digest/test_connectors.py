"""Salesforce and Confluence connectors against the emulators: token, paging, re-auth, Retry-After, errors."""
from __future__ import annotations

import time

import pytest
import requests

from shared.connectors.confluence import ConfluenceClient
from shared.connectors.http import ConnectorError, RetryPolicy
from shared.connectors.salesforce import SalesforceClient

from .conftest import ago, fault, seed_confluence, seed_salesforce


def _sf(emu, **kw) -> SalesforceClient:
    return SalesforceClient(emu.salesforce_url, emu.salesforce_client_id, emu.salesforce_client_secret, **kw)


def test_salesforce_query_follows_next_records_url(emu):
    seed_salesforce(emu, "Account", [{"Name": f"Client {i:03d}", "AnnualRevenue": i * 1000} for i in range(450)])
    sf = _sf(emu, batch_size=200)
    first = sf.query_page("SELECT Id, Name FROM Account")
    assert first["totalSize"] == 450 and not first["done"] and "nextRecordsUrl" in first
    records = sf.query_all("SELECT Id, Name, AnnualRevenue FROM Account WHERE AnnualRevenue >= 100000 ORDER BY Name")
    assert len(records) == 350
    assert records[0]["Name"] == "Client 100" and "attributes" not in records[0]
    assert len({r["Id"] for r in records}) == 350


def test_salesforce_reauthenticates_once_when_the_session_expires(emu):
    seed_salesforce(emu, "Account", [{"Name": "Acme"}])
    sf = _sf(emu)
    assert sf.query_all("SELECT Name FROM Account") == [{"Name": "Acme"}]
    requests.post(emu.salesforce_url + "/_emulator/salesforce/revoke-tokens", timeout=5).raise_for_status()
    assert sf.query_all("SELECT Name FROM Account") == [{"Name": "Acme"}]
    state = requests.get(emu.salesforce_url + "/_emulator/salesforce/state", timeout=5).json()
    assert state["tokens_issued"] == 1  # the revoked one was replaced by exactly one new token


def test_salesforce_errors_are_typed(emu):
    with pytest.raises(ConnectorError) as err:
        _sf(emu).query_all("SELEC Name FROM Account")
    assert err.value.status == 400 and "MALFORMED_QUERY" in str(err.value)
    with pytest.raises(ConnectorError) as err:
        SalesforceClient(emu.salesforce_url, emu.salesforce_client_id, "wrong-secret").query_all("SELECT Id FROM Account")
    assert err.value.status == 400 and "invalid_client" in str(err.value)


def test_salesforce_honours_retry_after(emu):
    seed_salesforce(emu, "Case", [{"Subject": "x", "Status": "New"}])
    fault(emu.salesforce_url, "salesforce", {"path": "/services/data/*/query", "status": 503, "retry_after": "0.4"})
    t0 = time.monotonic()
    assert len(_sf(emu).query_all("SELECT Id FROM Case WHERE IsClosed = false")) == 1
    assert time.monotonic() - t0 >= 0.4
    fault(emu.salesforce_url, "salesforce", {"path": "/services/data/*/query", "status": 503, "count": None})
    with pytest.raises(ConnectorError) as err:
        _sf(emu, policy=RetryPolicy(attempts=2, base_delay=0.01)).query_all("SELECT Id FROM Case")
    assert err.value.status == 503


def test_confluence_page_and_versions_with_cursor_paging(emu):
    (pid,) = seed_confluence(emu, [{"title": "Acme payroll configuration", "space": "CFG", "versions": [
        {"body": f"v{i}", "created": ago(50 - i), "minor": i % 2 == 1, "message": f"edit {i}"} for i in range(5)]}])
    conf = ConfluenceClient(emu.confluence_url, emu.jira_user, emu.jira_token)
    page = conf.get_page(pid)
    assert page["title"] == "Acme payroll configuration" and page["version"]["number"] == 5
    versions = list(conf.page_versions(pid, limit=2))
    assert [v["number"] for v in versions] == [5, 4, 3, 2, 1]  # newest first, across three pages
    assert versions[1]["minorEdit"] is True
    with pytest.raises(ConnectorError) as err:
        conf.get_page("999999")
    assert err.value.status == 404


def test_confluence_retries_and_auth(emu):
    (pid,) = seed_confluence(emu, [{"title": "Doc", "body": "x"}])
    fault(emu.confluence_url, "confluence", {"path": f"/wiki/api/v2/pages/{pid}", "status": 429, "retry_after": "0.3"})
    conf = ConfluenceClient(emu.confluence_url, emu.jira_user, emu.jira_token)
    t0 = time.monotonic()
    assert conf.get_page(pid)["id"] == pid
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises(ConnectorError) as err:
        ConfluenceClient(emu.confluence_url, emu.jira_user, "wrong").get_page(pid)
    assert err.value.status == 401
