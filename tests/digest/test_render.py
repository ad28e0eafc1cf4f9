"""Renderings escape untrusted ticket text; Slack limits hold; the narrative's grounding check."""
from __future__ import annotations

import json

from services.digest.narrative import check_grounded
from services.digest.render import Item, Report, render_all, to_slack

HOSTILE = "<!channel> <https://evil.example|click> & <script>alert(1)</script> *bold* [x](https://evil.example)"


def _report(n_items: int = 3, **kw: object) -> Report:
    items = tuple(Item(title=f"{HOSTILE} #{i}", key=f"PAY-{i}", url=f"https://jira.example/browse/PAY-{i}",
                       badge="score 50 · High", lines=(f"stale: {HOSTILE}",)) for i in range(n_items))
    base = dict(kind="weekly", title="Weekly digest", context="as of 2025-06-02", narrative=f"PAY-0 leads. {HOSTILE}",
                narrative_note="Narrative from the offline template (no LLM configured).", items=items,
                facts=("a fact",), footer="Digest x")
    base.update(kw)
    return Report(**base)  # type: ignore[arg-type]


def test_slack_escapes_mentions_and_links_from_ticket_text():
    msg = to_slack(_report())
    text = json.dumps(msg)
    assert "<!channel>" not in text and "<https://evil" not in text and "<script>" not in text
    assert "&lt;!channel&gt;" in text
    # Our own links are real links; the key is the only link text.
    assert "<https://jira.example/browse/PAY-1|PAY-1>" in text
    assert msg["blocks"][0]["type"] == "header"
    assert any("offline template" in json.dumps(b) for b in msg["blocks"])


def test_slack_respects_block_and_section_limits():
    long_lines = tuple("x" * 500 for _ in range(10))
    report = _report(60, items=tuple(Item(title="t", key=f"PAY-{i}", lines=long_lines) for i in range(60)))
    msg = to_slack(report)
    assert len(msg["blocks"]) <= 50
    assert all(len(b["text"]["text"]) <= 3000 for b in msg["blocks"] if b["type"] == "section")
    assert "more in the archived digest" in json.dumps(msg["blocks"][-2:])


def test_html_and_markdown_escape_everything_untrusted():
    out = render_all(_report())
    html = out["email"]["html"]
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="https://jira.example/browse/PAY-1"' in html
    assert 'href="https://evil.example' not in html
    md = out["markdown"]
    assert "<script>" not in md and "[x](https://evil.example)" not in md
    assert "[PAY-1](https://jira.example/browse/PAY-1)" in md
    assert "offline template" in md and "offline template" in out["email"]["text"]


def test_unsafe_urls_are_not_linked():
    item = Item(title="t", key="PAY-1", url="javascript:alert(1)")
    out = render_all(_report(items=(item,)))
    assert "javascript:" not in json.dumps(out["slack"]) and "javascript:" not in out["email"]["html"]
    assert "javascript:" not in out["markdown"]


def test_grounding_check():
    keys = {"PAY-1", "PAY-2"}
    assert check_grounded("PAY-1 needs attention because it blocks payroll.", keys, require_citation=True) is None
    assert "PAY-7" in (check_grounded("PAY-1 and PAY-7 are late.", keys, require_citation=True) or "")
    assert check_grounded("Things are late.", keys, require_citation=True) == "the model cited no ticket key"
    assert "link" in (check_grounded("See PAY-1 at https://x.example", keys, require_citation=True) or "")
    assert check_grounded("  ", keys, require_citation=False) == "the model returned no text"
    assert check_grounded("All clients are healthy.", set(), require_citation=False) is None
