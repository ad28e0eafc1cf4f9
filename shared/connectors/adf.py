"""Atlassian Document Format: plain text → ADF, ADF → plain text."""
from __future__ import annotations

from typing import Any


def text_to_adf(text: str) -> dict[str, Any]:
    """Paragraphs split on blank lines; single newlines become hardBreaks. Text stays text (no markup parsing)."""
    content: list[dict[str, Any]] = []
    for para in text.replace("\r\n", "\n").split("\n\n"):
        if not para.strip():
            continue
        nodes: list[dict[str, Any]] = []
        for i, line in enumerate(para.split("\n")):
            if i:
                nodes.append({"type": "hardBreak"})
            if line:
                nodes.append({"type": "text", "text": line})
        content.append({"type": "paragraph", "content": nodes})
    return {"type": "doc", "version": 1, "content": content}


def adf_to_text(node: Any) -> str:
    """Flatten an ADF document (or a plain string, as webhooks may carry) to text."""
    if node is None:
        return ""
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "".join(adf_to_text(n) for n in node)
    if not isinstance(node, dict):
        return ""
    kind = node.get("type")
    if kind == "text":
        return str(node.get("text", ""))
    if kind == "hardBreak":
        return "\n"
    inner = adf_to_text(node.get("content", []))
    if kind in {"paragraph", "heading", "codeBlock", "blockquote", "listItem", "rule"}:
        return inner + "\n"
    return inner


def is_adf(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "doc" and value.get("version") == 1 \
        and isinstance(value.get("content"), list)
