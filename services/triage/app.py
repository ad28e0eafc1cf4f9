"""Application factory for the triage service — wiring only."""
from __future__ import annotations

import os
from pathlib import Path

from flask import Flask

from shared.connectors.jira import JiraClient
from shared.settings import Settings
from shared.web import create_service_app

from . import service
from .api import TriageEngine, api
from .clients import DedupeClient, GuardrailsClient
from .config import default_model, load_prices, load_taxonomy, load_triage_config
from .prompt import build_prefix, build_tool

_TRUE = {"1", "true", "yes", "on"}


def build_engine(settings: Settings, *, llm_enabled: bool | None = None, webhook_secret: str | None = None,
                 jira_api_token: str | None = None) -> TriageEngine:
    """Load and validate the configuration and build the clients (fails fast with every config error)."""
    config_dir = Path(settings.config_dir)
    taxonomy = load_taxonomy(config_dir / "taxonomy.yaml")
    cfg = load_triage_config(config_dir / "triage.yaml", taxonomy)
    model = default_model(config_dir, cfg)
    prices = load_prices(config_dir)
    if model not in prices:
        raise RuntimeError(f"prices.yaml has no price for triage's model {model!r}")
    dedupe = DedupeClient(settings.dedupe_url, settings.own_token, timeout=cfg.retrieval_timeout)
    guardrails = GuardrailsClient(settings.guardrails_url, settings.own_token)
    if llm_enabled is None:
        # The Anthropic key lives in guardrails only; this switch says whether to use the gateway at all.
        llm_enabled = settings.extra.get("METIS_TRIAGE_LLM", "off").lower() in _TRUE
    deps = service.TriageDeps(
        taxonomy=taxonomy, cfg=cfg, prefix=build_prefix(taxonomy, cfg), tool=build_tool(taxonomy, cfg),
        model=model, prices=prices,
        similar=lambda t: dedupe.similar(t, cfg.similar_limit),
        duplicates=lambda t: dedupe.duplicates(t, cfg.duplicate_limit),
        llm=guardrails.messages_create if llm_enabled else None)
    lease = int(settings.extra.get("METIS_TRIAGE_CLAIM_LEASE_SECONDS", "900"))
    jira_url, jira_email = settings.extra.get("METIS_JIRA_URL"), settings.extra.get("METIS_JIRA_EMAIL")
    jira_token = jira_api_token if jira_api_token is not None else os.environ.get("METIS_JIRA_API_TOKEN")
    # Read-only use: the polling twin's JQL search. Without credentials polling answers 503, webhooks still work.
    jira = JiraClient(jira_url, jira_email, jira_token) if jira_url and jira_email and jira_token else None
    polling_env = settings.extra.get("METIS_TRIAGE_POLLING")
    polling = polling_env.lower() in _TRUE if polling_env else cfg.poll_enabled
    return TriageEngine(deps=deps, guardrails=guardrails, dedupe=dedupe,
                        webhook_secret=webhook_secret if webhook_secret is not None
                        else os.environ.get("METIS_JIRA_WEBHOOK_SECRET") or None,
                        claim_lease_seconds=lease, jira=jira, polling_enabled=polling)


def create_app(settings: Settings | None = None, *, llm_enabled: bool | None = None,
               webhook_secret: str | None = None, jira_api_token: str | None = None) -> Flask:
    """Build the triage app from explicit settings, else from the environment."""
    settings = settings or Settings.from_env("triage")
    eng = build_engine(settings, llm_enabled=llm_enabled, webhook_secret=webhook_secret,
                       jira_api_token=jira_api_token)
    app = create_service_app(settings, apis=[api])
    app.extensions["metis"].state["triage"] = eng
    return app
