"""docker-compose.yml cannot run here (no Docker engine); check what can be checked without one."""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from devstack.n8n import SMTP_CREDENTIAL_ID, SMTP_CREDENTIAL_NAME, TOKEN_CREDENTIAL_ID, TOKEN_CREDENTIAL_NAME, pinned_version
from shared.settings import SERVICE_PORTS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
# ${VAR}, ${VAR:?msg}, ${VAR:-} (empty default) or a default that is one of compose's own n8n webhooks
REFERENCE = re.compile(r"^\$\{([A-Z][A-Z0-9_]*)(:\?[^}]*|:-|:-http://n8n:5678/webhook/[a-z0-9-]+)?\}$")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ENCRYPTION_KEY|DATABASE_URL|WEBHOOK_URL")


def _env_items() -> Iterator[tuple[str, str, str]]:
    for name, svc in SERVICES.items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment must be a mapping"
        for key, value in env.items():
            yield name, key, str(value)


def test_it_parses_and_has_every_part():
    assert set(SERVICE_PORTS) | {"postgres", "migrate", "n8n", "n8n-setup", "prometheus"} <= set(SERVICES)
    assert set(COMPOSE["volumes"]) >= {"pgdata", "n8ndata", "promdata"}
    for name in ("postgres", "n8n", "prometheus", *SERVICE_PORTS):
        assert "healthcheck" in SERVICES[name], f"{name} has no health check"


@pytest.mark.parametrize("service,port", sorted(SERVICE_PORTS.items()))
def test_service_command_and_port_match_the_code(service: str, port: int):
    svc = SERVICES[service]
    assert svc["build"] == "." and (ROOT / "Dockerfile").exists()
    assert svc["command"] == ["gunicorn", "-c", "shared/gunicorn_conf.py", f"services.{service}.app:create_app()"]
    assert (ROOT / "shared" / "gunicorn_conf.py").exists()
    module = importlib.import_module(f"services.{service}.app")
    assert callable(getattr(module, "create_app", None)), f"services.{service}.app has no create_app"
    assert svc["environment"]["METIS_BIND"] == f"0.0.0.0:{port}"
    assert svc["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(svc["healthcheck"]["test"])
    assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # Peers find each other by service name on the same ports.
    for peer, peer_port in SERVICE_PORTS.items():
        assert svc["environment"][f"METIS_{peer.upper()}_URL"] == f"http://{peer}:{peer_port}"


def test_n8n_image_is_the_pinned_version():
    version = pinned_version()
    assert SERVICES["n8n"]["image"] == f"n8nio/n8n:{version}"
    assert SERVICES["n8n-setup"]["image"] == f"n8nio/n8n:{version}"
    assert SERVICES["n8n"]["depends_on"]["n8n-setup"]["condition"] == "service_completed_successfully"


def test_n8n_setup_creates_the_credentials_workflows_reference():
    script = (ROOT / "deploy" / "n8n" / "bootstrap.sh").read_text()
    for ident in (TOKEN_CREDENTIAL_ID, TOKEN_CREDENTIAL_NAME, SMTP_CREDENTIAL_ID, SMTP_CREDENTIAL_NAME):
        assert ident in script
    for step in ("import:credentials", "import:workflow --separate --input=/metis/workflows", "publish:workflow"):
        assert step in script
    mounts = SERVICES["n8n-setup"]["volumes"]
    assert "./n8n/workflows:/metis/workflows:ro" in mounts


def test_nothing_secret_is_inline():
    for service, key, value in _env_items():
        if SECRET_NAME.search(key) and not key.endswith("_FILE"):
            m = REFERENCE.match(value)
            assert m, f"{service}.{key} must be a ${{VARIABLE}} reference, not an inline value"
            assert m.group(1) == key, f"{service}.{key} must come from the variable of the same name"
    # n8n's process environment is readable from workflows ($env): its own secrets come as files.
    n8n_env = SERVICES["n8n"]["environment"]
    assert not {"N8N_ENCRYPTION_KEY", "DB_POSTGRESDB_PASSWORD", "METIS_TOKEN_N8N"} & set(n8n_env)
    assert n8n_env["N8N_ENCRYPTION_KEY_FILE"].startswith("/run/secrets/")
    for name, secret in COMPOSE["secrets"].items():
        assert set(secret) == {"environment"}, f"secret {name} must come from the env file"
    # Only guardrails holds the Anthropic key.
    holders = {service for service, key, _ in _env_items() if key == "ANTHROPIC_API_KEY"}
    assert holders == {"guardrails"}
    # No literal that looks like a credential anywhere in the file.
    for pattern in (r"sk-ant-", r"xox[abpr]-", r"hooks\.slack\.com/services/", r"://[^$/\s:@]+:[^$/\s@]+@",
                    r"-----BEGIN"):
        assert not re.search(pattern, COMPOSE_TEXT), pattern


def test_approvals_and_escalations_reach_composes_own_n8n_by_default():
    """With .env's empty values, guardrails hands pending actions and escalations to the n8n workflows that
    ask people (an unset URL would let every proposal expire unseen)."""
    paths = {n["parameters"].get("path") for f in (ROOT / "n8n" / "workflows").glob("*.json")
             for n in json.loads(f.read_text())["nodes"] if n["type"] == "n8n-nodes-base.webhook"}
    env = SERVICES["guardrails"]["environment"]
    for key in ("METIS_APPROVAL_WEBHOOK_URL", "METIS_ESCALATION_WEBHOOK_URL"):
        default = REFERENCE.match(env[key]).group(2)  # type: ignore[union-attr]
        assert default and default.startswith(":-http://n8n:5678/webhook/"), (key, env[key])
        assert default.rsplit("/", 1)[1] in paths, f"{key}: no workflow listens on {default}"


def test_env_example_documents_every_variable_without_values():
    example = (ROOT / ".env.example").read_text()
    documented: dict[str, str] = {}
    for line in example.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            documented[key] = value
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_TEXT))
    used |= {s["environment"] for s in COMPOSE["secrets"].values()}
    assert used - set(documented) == set(), "variables used by docker-compose.yml but not in .env.example"
    assert {k for k, v in documented.items() if v} == set(), ".env.example must not carry values"


def test_prometheus_scrapes_every_service_and_n8n():
    prom_mount = "./deploy/prometheus:/etc/prometheus:ro"
    assert prom_mount in SERVICES["prometheus"]["volumes"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {f"{s}:{p}" for s, p in SERVICE_PORTS.items()} | {"n8n:5678"} <= targets
    assert SERVICES["n8n"]["environment"]["N8N_METRICS"] == "true"


def test_dockerfile_runs_as_non_root_with_the_config():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER\s+(?!root)\S+", dockerfile, re.M)
    assert "COPY config ./config" in dockerfile and "METIS_CONFIG_DIR=/app/config" in dockerfile
    for package in ("shared", "services"):
        assert f"COPY {package} ./{package}" in dockerfile
