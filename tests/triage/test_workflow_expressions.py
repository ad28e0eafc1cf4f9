"""Static checks of the triage workflows: every n8n expression parses as one template (a `}}` inside the
JavaScript ends the expression early — n8n then fails at run time with 'invalid syntax')."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "n8n" / "workflows").glob("triage-*.json"))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_expressions_are_well_formed(path: Path) -> None:
    doc = json.loads(path.read_text())
    for s in _strings(doc):
        if not s.startswith("="):
            continue
        for m in re.finditer(r"\{\{(.*?)\}\}", s, re.S):
            inner = m.group(1)
            # Balanced braces inside each {{ ... }}: otherwise the template ended inside the code.
            assert inner.count("{") == inner.count("}"), f"{path.name}: unbalanced expression {m.group(0)[:120]}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_service_call_uses_the_n8n_credential_and_env_urls(path: Path) -> None:
    doc = json.loads(path.read_text())
    for node in doc["nodes"]:
        if node["type"] == "n8n-nodes-base.httpRequest":
            assert node["parameters"]["url"].startswith("={{ $env.METIS_"), node["name"]
            assert node["credentials"] == {"httpHeaderAuth": {"id": "metisN8nToken01", "name": "Metis n8n token"}}
