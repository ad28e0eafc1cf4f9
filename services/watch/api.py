"""HTTP API of the watch service."""
from __future__ import annotations

from shared.api import Api

api = Api("watch", __name__)
