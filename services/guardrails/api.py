"""HTTP API of the guardrails service."""
from __future__ import annotations

from shared.api import Api

api = Api("guardrails", __name__)
