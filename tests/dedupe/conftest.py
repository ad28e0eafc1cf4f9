"""Dedupe fixtures: the real MiniLM model loaded once per session, apps on the real test database."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from services.dedupe.app import create_app
from shared.embeddings import CachingEmbedder, Embedder, MiniLMEmbedder
from services.dedupe.config import load_config
from tests.conftest import auth

# Keep every dedupe test on one xdist worker: the model then loads once.
pytestmark = pytest.mark.xdist_group("dedupe")


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real model, as configured, loaded once for the whole session."""
    return CachingEmbedder(MiniLMEmbedder(load_config("config").embedding))


@pytest.fixture
def make_app(make_settings: Callable[..., Any], embedder: Embedder) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        factory_fn = overrides.pop("embedder_factory", lambda: embedder)
        app = create_app(make_settings("dedupe", **overrides), embedder_factory=factory_fn, background=False)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["metis"].pool.close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def ticket(key: str, summary: str, description: str = "", created: str = "2024-01-10T10:00:00+00:00",
           **extra: Any) -> dict[str, Any]:
    """A test ticket in the API's shape."""
    return {"key": key, "summary": summary, "description": description, "created": created, **extra}


def index(client: FlaskClient, tickets: list[dict[str, Any]]) -> dict[str, Any]:
    r = client.post("/v1/tickets", json={"tickets": tickets}, headers=auth("n8n"))
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()  # type: ignore[no-any-return]
