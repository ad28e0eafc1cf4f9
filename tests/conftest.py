"""Shared fixtures: a real PostgreSQL database per test session (per xdist worker), apps, clients."""
from __future__ import annotations

import os
import secrets
import uuid
from typing import Callable, Iterator

import psycopg
import pytest
from psycopg import sql

from shared import db
from shared.settings import SERVICE_PORTS, Secret, Settings

pytest_plugins = ["tests.fixtures.processes", "tests.fixtures.emulators", "tests.fixtures.n8n",
                  "tests.fixtures.browser"]

ADMIN_URL = os.environ.get("METIS_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SERVICES = tuple(SERVICE_PORTS)

# One token per caller, as in production; tests use these to call services.
TEST_TOKENS = {name: Secret(f"test-{name}-" + secrets.token_hex(12)) for name in
               ("n8n", "ops", "guardrails", "triage", "dedupe", "digest", "watch")}


def _db_url(name: str) -> str:
    base = ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def database_url(worker_id: str) -> Iterator[str]:
    """A fresh database for this session / worker with every service's migrations applied."""
    name = f"metis_test_{worker_id}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _db_url(name)
    for service in SERVICES:
        db.migrate(url, service)
    yield url
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def worker_id(request: pytest.FixtureRequest) -> str:
    wi = getattr(request.config, "workerinput", None)
    return wi["workerid"] if wi else "main"


@pytest.fixture(autouse=True)
def clean_db(request: pytest.FixtureRequest) -> Iterator[None]:
    """Per-test isolation: empty every service table after the test (migrations stay)."""
    yield
    if "database_url" not in request.fixturenames:
        return
    url = request.getfixturevalue("database_url")
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
            "WHERE schemaname = ANY(%s) AND tablename <> 'schema_migrations'", (list(SERVICES),)).fetchall()
        keep = {f"{s}.service_info" for s in SERVICES}
        tables = [r[0] for r in rows if r[0] not in keep]
        if tables:
            conn.execute("TRUNCATE " + ", ".join(tables) + " RESTART IDENTITY CASCADE")


@pytest.fixture(scope="session")
def tokens() -> dict[str, Secret]:
    return TEST_TOKENS


@pytest.fixture(scope="session")
def make_settings(database_url: str) -> Callable[..., Settings]:
    """Settings for a service with the test database and tokens; keyword overrides win."""

    def factory(service: str, **overrides: object) -> Settings:
        env = {"DATABASE_URL": database_url, "METIS_DB_POOL_MAX": "3", **{f"METIS_TOKEN_{k.upper()}": v.get() for k, v in TEST_TOKENS.items()}}
        return Settings.from_env(service, env, **overrides)

    return factory


def auth(caller: str = "n8n") -> dict[str, str]:
    """Authorization header for a test caller."""
    return {"Authorization": f"Bearer {TEST_TOKENS[caller].get()}"}
