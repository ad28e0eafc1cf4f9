"""Fixtures for the digest: the app wired to the emulators, seeding helpers for Salesforce and Confluence."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from services.digest.app import create_app
from services.digest.sources import SourceConfig
from shared.settings import Secret


def sources_for(emu: Any, *, salesforce: bool = True, confluence: bool = True, retries: int = 2) -> SourceConfig:
    """Source settings pointing at the emulators (what METIS_JIRA_URL etc. carry in production)."""
    return SourceConfig(
        jira_url=emu.jira_url, jira_email=emu.jira_user, jira_token=Secret(emu.jira_token),
        salesforce_url=emu.salesforce_url if salesforce else "",
        salesforce_client_id=emu.salesforce_client_id,
        salesforce_client_secret=Secret(emu.salesforce_client_secret),
        confluence_url=emu.confluence_url if confluence else "", confluence_email=emu.jira_user,
        confluence_token=Secret(emu.jira_token), retry_attempts=retries)


def ago(days: float, now: datetime | None = None) -> str:
    """ISO timestamp `days` before now (the emulators seed absolute times)."""
    return ((now or datetime.now(timezone.utc)) - timedelta(days=days)).isoformat()


# The custom Account fields config/digest.yaml reads; a real org defines them once, the emulator learns
# fields from seeded records, so every seeded Account carries them (null when unset).
ACCOUNT_FIELDS = ("AnnualRevenue", "Metis_Client_Key__c", "Renewal_Date__c", "Config_Doc_Page_Id__c",
                  "Config_Last_Changed__c")


def seed_salesforce(emu: Any, obj: str, records: list[dict[str, Any]]) -> list[str]:
    """Create Salesforce records (Accounts get every configured field)."""
    if obj == "Account":
        records = [{**{f: None for f in ACCOUNT_FIELDS}, **r} for r in records]
    r = requests.post(emu.salesforce_url + "/_emulator/salesforce/records", json={"object": obj, "records": records},
                      timeout=10)
    r.raise_for_status()
    return list(r.json()["ids"])


def seed_confluence(emu: Any, pages: list[dict[str, Any]]) -> list[str]:
    r = requests.post(emu.confluence_url + "/_emulator/confluence/pages", json={"pages": pages}, timeout=10)
    r.raise_for_status()
    return list(r.json()["ids"])


def fault(url: str, service: str, spec: dict[str, Any]) -> None:
    """Inject a fault into an emulator (`service` is salesforce / confluence / jira)."""
    requests.post(f"{url}/_emulator/{service}/faults", json=spec, timeout=10).raise_for_status()


@pytest.fixture(scope="session")
def shared_embedder() -> Callable[[], Any]:
    """One MiniLM per test session (loading it takes seconds)."""
    loaded: list[Any] = []

    def get() -> Any:
        if not loaded:
            from services.digest.embedding import load_embedder
            loaded.append(load_embedder())
        return loaded[0]

    return get


@pytest.fixture(scope="module")
def digest_app_factory(make_settings: Callable[..., Any], emulators: Any,
                       shared_embedder: Callable[[], Any]) -> Iterator[Callable[..., Flask]]:
    """Build digest apps on the test database and the emulators; pools are closed at the end."""
    apps: list[Flask] = []

    def build(**kwargs: Any) -> Flask:
        source_kw = {k: kwargs.pop(k) for k in ("salesforce", "confluence") if k in kwargs}
        kwargs.setdefault("sources", sources_for(emulators, **source_kw))
        kwargs.setdefault("embedder", shared_embedder)
        app = create_app(make_settings("digest"), **kwargs)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["metis"].pool.close()


@pytest.fixture(scope="module")
def digest_app(digest_app_factory: Callable[..., Flask]) -> Flask:
    return digest_app_factory()


@pytest.fixture
def client(digest_app: Flask, emu: Any) -> FlaskClient:
    """A test client on the shared app, with every emulator reset."""
    return digest_app.test_client()
