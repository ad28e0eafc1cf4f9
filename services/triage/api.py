"""HTTP API of the triage service."""
from __future__ import annotations

from shared.api import Api

api = Api("triage", __name__)
