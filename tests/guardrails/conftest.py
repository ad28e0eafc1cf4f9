"""Fixtures for guardrails: a test policy (the repo's files with overrides), the app in-process over real HTTP."""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
import yaml
from flask import Flask
from werkzeug.serving import make_server

from devstack.processes import free_port
from services.guardrails.app import create_app
from shared.guardrails_client import GuardrailsClient
from tests.conftest import TEST_TOKENS

ROOT = Path(__file__).resolve().parents[2]


def ensure_tool(name: str) -> str:
    """Path of a Debian-packaged tool the tests need (promtool, chromium); installs it with the repo's own
    scripts/ensure-debian-packages.sh when missing (a clean machine), fails clearly if that is impossible."""
    import shutil
    import subprocess

    path = shutil.which(name)
    if path is None:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "ensure-debian-packages.sh")], capture_output=True,
                           text=True, timeout=900)
        path = shutil.which(name)
        assert path, f"{name} is missing and scripts/ensure-debian-packages.sh could not install it:\n{r.stderr[-2000:]}"
    return path

# Small, round caps so tests can reason in whole micro-dollars.
TEST_OVERRIDES: dict[str, Any] = {
    "limits": {"daily_usd": 1.0, "monthly_usd": 5.0, "reservation_timeout_seconds": 60},
    "heartbeats": {"fast-job": {"interval_seconds": 60, "grace_seconds": 0},
                   "digest-stale-scan": {"interval_seconds": 3600, "grace_seconds": 600}},
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not k.startswith("="):
            out[k] = deep_merge(out[k], v)
        else:
            out[k.lstrip("=")] = copy.deepcopy(v)
    return out


def write_config(directory: Path, policy_over: dict[str, Any] | None = None,
                 prices_over: dict[str, Any] | None = None) -> Path:
    """Write policy.yaml / prices.yaml = the repo's files + TEST_OVERRIDES + the given overrides."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())
    prices = yaml.safe_load((ROOT / "config" / "prices.yaml").read_text())
    policy = deep_merge(deep_merge(policy, TEST_OVERRIDES), policy_over or {})
    prices = deep_merge(prices, prices_over or {})
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    (directory / "prices.yaml").write_text(yaml.safe_dump(prices, sort_keys=False))
    return directory


@dataclass
class Guardrails:
    """A guardrails app served over real HTTP in this process (so tests can also reach its internals)."""

    app: Flask
    url: str
    config_dir: Path

    @property
    def pool(self) -> Any:
        return self.app.extensions["metis"].pool

    @property
    def state(self) -> dict[str, Any]:
        return self.app.extensions["metis"].state

    @property
    def policy(self) -> Any:
        return self.state["policies"].get()

    def client(self, caller: str = "triage") -> GuardrailsClient:
        return GuardrailsClient(self.url, TEST_TOKENS[caller])


@pytest.fixture
def make_guardrails(make_settings: Callable[..., Any], tmp_path: Path,
                    request: pytest.FixtureRequest) -> Iterator[Callable[..., Guardrails]]:
    """Factory: start guardrails with policy overrides, pointed at the Anthropic emulator when `emu` is used."""
    started: list[tuple[Any, threading.Thread, Guardrails]] = []

    def factory(policy: dict[str, Any] | None = None, prices: dict[str, Any] | None = None, *,
                anthropic_url: str | None = None, anthropic_key: str = "sk-ant-none",
                extra: dict[str, str] | None = None, database_url: str | None = None) -> Guardrails:
        cfg = write_config(tmp_path / f"config{len(started)}", policy, prices)
        overrides: dict[str, Any] = {"config_dir": str(cfg),
                                     "extra": {"METIS_ANTHROPIC_URL": anthropic_url or "http://127.0.0.1:9",
                                               "METIS_ANTHROPIC_TIMEOUT": "20",
                                               # Small pools: the whole suite shares one PostgreSQL.
                                               "METIS_DB_POOL_MIN": "1", "METIS_DB_POOL_SIZE": "6",
                                               **(extra or {})}}
        if database_url:
            overrides["database_url"] = database_url
        settings = make_settings("guardrails", **overrides)
        app = create_app(settings, anthropic_api_key=anthropic_key, background=False)
        port = free_port()
        server = make_server("127.0.0.1", port, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        gr = Guardrails(app, f"http://127.0.0.1:{port}", cfg)
        started.append((server, thread, gr))
        return gr

    yield factory
    for server, thread, gr in started:
        server.shutdown()
        thread.join(5)
        gr.pool.close()


@pytest.fixture
def guardrails(make_guardrails: Callable[..., Guardrails]) -> Guardrails:
    """Guardrails with the test policy, upstream unreachable (for tests that never reach Anthropic)."""
    return make_guardrails()


@pytest.fixture
def gw(make_guardrails: Callable[..., Guardrails], emu: Any) -> Guardrails:
    """Guardrails with the test policy, forwarding to the Anthropic emulator."""
    return make_guardrails(anthropic_url=emu.anthropic_url, anthropic_key=emu.anthropic_key)


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A superuser autocommit connection to the test database (for inspection and tampering)."""
    from psycopg.rows import dict_row

    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn
