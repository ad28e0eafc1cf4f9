"""HTTP API of the digest service."""
from __future__ import annotations

from shared.api import Api

api = Api("digest", __name__)
