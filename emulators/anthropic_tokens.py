"""The emulator's deterministic token counter and the prompt-cache segmentation built on it.

Counting rules (documented because guardrails bounds its worst-case reservation with them):

* a text (message text, system text, tool_result string, thinking) costs ceil(chars / 4) tokens;
* a JSON value (tool definition, tool_use input, any other block) costs ceil(S / 4) where S counts
  every object key and string by its characters and every number / bool / null as 1 character —
  keys named ``cache_control`` are skipped;
* fixed overheads: ``REQUEST_OVERHEAD_TOKENS`` once, ``MESSAGE_OVERHEAD_TOKENS`` per message, and,
  when ``tools`` are given, the tool-use system prompt ``TOOL_USE_SYSTEM_PROMPT_TOKENS[tool_choice]``
  (Anthropic's published figures for Claude 4 models).

Every counted character is a distinct character of the request body, a UTF-8 character is at least one
byte, and the request / message overheads are smaller than the JSON punctuation and the ``role`` /
``content`` / ``model`` keys they stand for, which are never counted. Hence, for any valid request:

    input_tokens <= len(raw_body_utf8) + (TOOL_USE_SYSTEM_PROMPT_TOKENS[choice] if tools else 0)

which ``max_input_tokens_bound`` computes and the tests check with hypothesis.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
REQUEST_OVERHEAD_TOKENS = 3
MESSAGE_OVERHEAD_TOKENS = 3
# Anthropic: tool-use system prompt added when `tools` is non-empty (Claude 4 family figures).
TOOL_USE_SYSTEM_PROMPT_TOKENS: dict[str, int] = {"auto": 346, "none": 346, "any": 313, "tool": 313}
MAX_FIXED_OVERHEAD_TOKENS = max(TOOL_USE_SYSTEM_PROMPT_TOKENS.values())
# Images / documents are billed by size in reality; the emulator caps them so a screenshot is not 30k tokens.
MEDIA_TOKEN_CAP = 1600


def text_tokens(text: str) -> int:
    """Tokens of a text: ceil(chars / 4) (never more than its UTF-8 byte length)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _json_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _json_chars(v) for k, v in value.items() if k != "cache_control")
    if isinstance(value, list):
        return sum(_json_chars(v) for v in value)
    return 1  # number, bool, null: at least one byte in the body


def json_tokens(value: Any) -> int:
    """Tokens of a JSON value by the structural rule in the module docstring."""
    return math.ceil(_json_chars(value) / CHARS_PER_TOKEN)


def tool_choice_type(body: dict[str, Any]) -> str:
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("type"), str):
        return str(choice["type"])
    return "auto"


def max_input_tokens_bound(raw_body: bytes, body: dict[str, Any]) -> int:
    """The documented upper bound on input_tokens for a request body (bytes + tool-use system prompt)."""
    extra = TOOL_USE_SYSTEM_PROMPT_TOKENS.get(tool_choice_type(body), MAX_FIXED_OVERHEAD_TOKENS) if body.get("tools") else 0
    return len(raw_body) + extra


def _strip_cc(block: Any) -> Any:
    if isinstance(block, dict):
        return {k: v for k, v in block.items() if k != "cache_control"}
    return block


def block_tokens(block: dict[str, Any]) -> int:
    """Tokens of one content block."""
    kind = block.get("type")
    if kind == "text":
        return text_tokens(str(block.get("text", "")))
    if kind == "tool_use":
        return text_tokens(str(block.get("name", ""))) + json_tokens(block.get("input", {}))
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, str):
            return text_tokens(content)
        if isinstance(content, list):
            return sum(block_tokens(b) for b in content if isinstance(b, dict))
        return 0
    if kind == "thinking":
        return text_tokens(str(block.get("thinking", "")))
    if kind in ("image", "document"):
        return min(json_tokens(block.get("source", {})), MEDIA_TOKEN_CAP)
    return json_tokens({k: v for k, v in block.items() if k != "type"})


@dataclass
class Segment:
    """One cacheable position in the prompt prefix (a tool, a system block, or a message content block)."""

    section: str
    label: str
    tokens: int
    prefix: bytes
    block: dict[str, Any]
    cache_control: dict[str, Any] | None

    @property
    def canonical(self) -> bytes:
        """Exact identity of the block (cache_control excluded), computed only when caching needs it."""
        return self.prefix + json.dumps(_strip_cc(self.block), sort_keys=True).encode()


def message_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def system_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    system = body.get("system")
    if system is None:
        return []
    if isinstance(system, str):
        return [{"type": "text", "text": system}] if system else []
    return [b for b in system if isinstance(b, dict)]


def segments(body: dict[str, Any]) -> tuple[int, list[Segment]]:
    """(preamble tokens, segments in prefix order tools → system → messages) of a validated request."""
    tools = body.get("tools") or []
    preamble = REQUEST_OVERHEAD_TOKENS
    if tools:
        preamble += TOOL_USE_SYSTEM_PROMPT_TOKENS.get(tool_choice_type(body), MAX_FIXED_OVERHEAD_TOKENS)
    # tool_choice changes invalidate the system and message caches but not the tool cache (as upstream).
    choice = json.dumps(body.get("tool_choice"), sort_keys=True).encode()
    out: list[Segment] = []
    for i, tool in enumerate(tools):
        out.append(Segment("tools", f"tools.{i}", json_tokens(tool), b"", tool, tool.get("cache_control")))
    for i, block in enumerate(system_blocks(body)):
        out.append(Segment("system", f"system.{i}", block_tokens(block), choice, block, block.get("cache_control")))
    for m, message in enumerate(body.get("messages") or []):
        for j, block in enumerate(message_blocks(message)):
            tokens = block_tokens(block) + (MESSAGE_OVERHEAD_TOKENS if j == 0 else 0)
            prefix = choice + f"{message.get('role')}|{m}|{j}|".encode()
            out.append(Segment("messages", f"messages.{m}.content.{j}", tokens, prefix, block, block.get("cache_control")))
    return preamble, out


def count_input_tokens(body: dict[str, Any]) -> int:
    """Total input tokens of a validated request (what count_tokens returns)."""
    preamble, segs = segments(body)
    return preamble + sum(s.tokens for s in segs)


def prefix_hashes(seed: bytes, segs: list[Segment]) -> list[bytes]:
    """Chained hash of every prefix: hashes[i] identifies segments[0..i] exactly."""
    out: list[bytes] = []
    h = hashlib.sha256(seed).digest()
    for s in segs:
        h = hashlib.sha256(h + hashlib.sha256(s.canonical).digest()).digest()
        out.append(h)
    return out
