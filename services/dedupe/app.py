"""Application factory for the dedupe service — wiring only."""
from __future__ import annotations

from flask import Flask

from shared.settings import Settings
from shared.web import create_service_app

from .api import api


def create_app(settings: Settings | None = None) -> Flask:
    """Build the dedupe app from explicit settings, else from the environment."""
    settings = settings or Settings.from_env("dedupe")
    return create_service_app(settings, apis=[api])
