"""Application factory for the digest service — wiring only."""
from __future__ import annotations

import logging
from typing import Callable

from flask import Flask

from shared.settings import Settings
from shared.web import create_service_app

from . import metrics, repository
from .api import api
from .config import load_config
from .llm import gateway_llm_factory
from .narrative import LLM
from .service import Deps, Embedder
from .sources import SourceConfig, Sources

log = logging.getLogger(__name__)


def default_embedder() -> Callable[[], Embedder]:
    """dedupe's local MiniLM embedder, loaded on first use (pattern detection only needs it weekly)."""
    loaded: list[Embedder] = []

    def get() -> Embedder:
        if not loaded:
            from .embedding import load_embedder
            loaded.append(load_embedder())
        return loaded[0]

    return get


def create_app(settings: Settings | None = None, *, sources: SourceConfig | None = None,
               llm_for_run: Callable[[str | None], tuple[LLM | None, str]] | None = None,
               embedder: Callable[[], Embedder] | None = None) -> Flask:
    """Build the digest app from explicit settings and sources, else from the environment."""
    settings = settings or Settings.from_env("digest")
    config = load_config(settings.config_dir)  # invalid config stops start-up with every error listed
    source_cfg = sources or SourceConfig.from_env()
    app = create_service_app(settings, apis=[api])
    service_ctx = app.extensions["metis"]
    deps = Deps(config=config, sources=Sources.from_config(source_cfg), pool=service_ctx.pool,
                llm_for_run=llm_for_run or gateway_llm_factory(settings, config.narrative),
                embedder=embedder or default_embedder())
    service_ctx.state["deps"] = deps
    service_ctx.ready_checks["jira"] = deps.sources.require_jira
    try:
        # Dashboards show the last known health right after a restart, not an empty gap.
        with service_ctx.pool.connection() as conn:
            metrics.export_health(repository.latest_health(conn))
    except Exception as exc:  # a cold cache of gauges must not stop the service; readyz reports the DB
        log.warning("could not restore health gauges", extra={"error": str(exc)[:200]})
    return app
