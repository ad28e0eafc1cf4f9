"""HTTP API of the dedupe service."""
from __future__ import annotations

from shared.api import Api

api = Api("dedupe", __name__)
