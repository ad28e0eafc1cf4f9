"""Application factory for the dedupe service — wiring only."""
from __future__ import annotations

import json
import os
from typing import Callable

from flask import Flask, request

from shared.embeddings import CachingEmbedder, Embedder, make_embedder
from shared.settings import Settings
from shared.web import create_service_app

from .api import api
from .config import load_config
from .intake import load_intake_config
from .intake_api import IntakeEngine
from .intake_api import api as intake_api
from .llm import LlmVerifier
from .service import Engine, ModelHolder

MAX_BODY = 64 * 1024 * 1024  # big batches are fine; beyond this, split the batch


def create_app(settings: Settings | None = None, *, embedder_factory: Callable[[], Embedder] | None = None,
               background: bool = True, webhook_secret: str | None = None) -> Flask:
    """Build the dedupe app; the model and index load in the background (see /readyz)."""
    settings = settings or Settings.from_env("dedupe")
    config = load_config(settings.config_dir)
    holder = ModelHolder(embedder_factory or (lambda: CachingEmbedder(make_embedder(config.embedding))))
    engine_box: dict[str, Engine] = {}
    # The Jira webhook secret is read here only (never in settings.extra, which leaves secrets out).
    intake = IntakeEngine(config=load_intake_config(settings.config_dir),
                          webhook_secret=webhook_secret if webhook_secret is not None
                          else os.environ.get("METIS_JIRA_WEBHOOK_SECRET") or None,
                          claim_lease_seconds=int(settings.extra.get("METIS_DEDUPE_CLAIM_LEASE_SECONDS", "900")))
    app = create_service_app(settings, apis=[api, intake_api], ready_checks={
        "model": holder.check, "index": lambda: engine_box["engine"].ready_check()})
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    service_ctx = app.extensions["metis"]
    engine = Engine(config=config, pool=service_ctx.pool, model=holder)
    engine_box["engine"] = engine
    service_ctx.state["engine"] = engine
    service_ctx.state["intake"] = intake
    if config.llm.enabled and settings.extra.get("METIS_DEDUPE_LLM", "off").lower() in ("on", "1", "true"):
        base = settings.extra.get("METIS_DEDUPE_LLM_BASE_URL") or f"{settings.guardrails_url}/anthropic"
        service_ctx.state["verifier"] = LlmVerifier(base_url=base, api_key=settings.own_token.get(),
                                                    config=config.llm)

    @app.before_request
    def _lenient_utf8() -> None:
        # Ticket text comes from anywhere: a body that is not valid UTF-8 is decoded with replacement
        # characters instead of being refused as "not JSON".
        if request.method in ("POST", "PUT", "PATCH") and request.is_json:
            raw = request.get_data(cache=True)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                try:
                    parsed = json.loads(raw.decode("utf-8", "replace"))
                except ValueError:
                    return
                request._cached_json = (parsed, parsed)  # type: ignore[attr-defined]

    engine.start(background=background)
    return app
