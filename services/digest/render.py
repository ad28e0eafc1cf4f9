"""One report, three renderings: Slack Block Kit, an HTML email (with a text part) and Markdown.

Ticket text and LLM output are untrusted: every rendering escapes them for its own syntax, so a
summary cannot ping @channel, inject a link, or add HTML.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from jinja2 import Environment, select_autoescape

# Slack limits: 50 blocks per message, 3000 characters per section, 150 per header.
SLACK_MAX_BLOCKS = 50
SLACK_SECTION_CHARS = 3000
SLACK_HEADER_CHARS = 150
MAX_ITEMS = 40


@dataclass(frozen=True)
class Item:
    """One listed thing (a ticket, a pattern, a client) with a title line and detail lines."""

    title: str
    key: str | None = None
    url: str | None = None
    badge: str = ""
    lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    kind: str
    title: str
    context: str
    narrative: str
    narrative_note: str
    items: tuple[Item, ...]
    facts: tuple[str, ...] = ()
    hidden: int = 0                    # items not listed (archived and in the API response)
    empty_text: str = "Nothing to report."
    footer: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def slack_escape(text: str) -> str:
    """Slack mrkdwn control characters (&, <, >) escaped; this also defuses <!channel> and <url|x> links."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_SAFE_URL = re.compile(r"^https?://[^\s<>|\"']+$")


def _safe_url(url: str | None) -> str | None:
    return url if url and _SAFE_URL.match(url) else None


def to_slack(report: Report) -> dict[str, Any]:
    """A Block Kit message for an incoming webhook (fallback `text` for notifications)."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _truncate(report.title, SLACK_HEADER_CHARS),
                                    "emoji": False}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _truncate(slack_escape(report.context), 2000)}]},
    ]
    if report.narrative:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _truncate(
            slack_escape(report.narrative), SLACK_SECTION_CHARS)}})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _truncate(
        "_" + slack_escape(report.narrative_note) + "_", 2000)}]})
    if report.facts:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _truncate(
            "\n".join("• " + slack_escape(f) for f in report.facts), SLACK_SECTION_CHARS)}})
    blocks.append({"type": "divider"})
    # Leave room for the trailing "more" and footer blocks.
    room = SLACK_MAX_BLOCKS - len(blocks) - 2
    shown = report.items[:room]
    for item in shown:
        url = _safe_url(item.url)
        head = f"*<{url}|{slack_escape(item.key)}>*" if url and item.key else \
            (f"*{slack_escape(item.key)}*" if item.key else "")
        title = slack_escape(item.title)
        line = f"{head} {title}".strip() if head else f"*{title}*"
        if item.badge:
            line += f"  ·  {slack_escape(item.badge)}"
        body = "\n".join([line, *("• " + slack_escape(x) for x in item.lines)])
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _truncate(body, SLACK_SECTION_CHARS)}})
    if not report.items:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": slack_escape(report.empty_text)}})
    hidden = report.hidden + len(report.items) - len(shown)
    if hidden:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn",
                                                        "text": f"…and {hidden} more in the archived digest."}]})
    if report.footer:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn",
                                                        "text": _truncate(slack_escape(report.footer), 2000)}]})
    return {"text": _truncate(f"{report.title} — {report.context}", 3000), "blocks": blocks}


_env = Environment(autoescape=select_autoescape(default=True, default_for_string=True), trim_blocks=True,
                   lstrip_blocks=True)
_HTML = _env.from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>{{ r.title }}</title></head>
<body style="font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; color: #1d1c1d; max-width: 760px;">
<h1 style="font-size: 20px;">{{ r.title }}</h1>
<p style="color: #616061;">{{ r.context }}</p>
{% if r.narrative %}<p>{{ r.narrative }}</p>{% endif %}
<p style="color: #616061; font-style: italic;">{{ r.narrative_note }}</p>
{% if r.facts %}<ul>{% for f in r.facts %}<li>{{ f }}</li>{% endfor %}</ul>{% endif %}
<hr>
{% if not r.items %}<p>{{ r.empty_text }}</p>{% endif %}
{% for it in r.items %}
<div style="margin: 0 0 14px 0;">
  <div><strong>{% if it.key %}{% if safe_url(it.url) %}<a href="{{ safe_url(it.url) }}">{{ it.key }}</a>{% else %}{{ it.key }}{% endif %} {% endif %}{{ it.title }}</strong>{% if it.badge %} <span style="color: #616061;">· {{ it.badge }}</span>{% endif %}</div>
  {% if it.lines %}<ul style="margin: 4px 0;">{% for l in it.lines %}<li>{{ l }}</li>{% endfor %}</ul>{% endif %}
</div>
{% endfor %}
{% if r.hidden %}<p>…and {{ r.hidden }} more in the archived digest.</p>{% endif %}
{% if r.footer %}<p style="color: #616061; font-size: 12px;">{{ r.footer }}</p>{% endif %}
</body></html>
""")


def to_html(report: Report) -> str:
    """The HTML body of the email; every value is autoescaped."""
    return _HTML.render(r=report, safe_url=_safe_url)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md_escape(text: str) -> str:
    """Markdown-significant characters escaped and HTML neutralised, so ticket text stays text."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def to_markdown(report: Report) -> str:
    """Markdown for the archive, wikis and the email's text part."""
    out = [f"# {md_escape(report.title)}", "", f"_{md_escape(report.context)}_", ""]
    if report.narrative:
        out += [md_escape(report.narrative), ""]
    out += [f"_{md_escape(report.narrative_note)}_", ""]
    if report.facts:
        out += [f"- {md_escape(f)}" for f in report.facts] + [""]
    if not report.items:
        out += [md_escape(report.empty_text), ""]
    for i, it in enumerate(report.items, 1):
        url = _safe_url(it.url)
        key = f"[{md_escape(it.key)}]({url})" if it.key and url else (md_escape(it.key) if it.key else "")
        head = f"{i}. **{key + ' ' if key else ''}{md_escape(it.title)}**"
        if it.badge:
            head += f" · {md_escape(it.badge)}"
        out.append(head)
        out += [f"    - {md_escape(line)}" for line in it.lines]
    if report.hidden:
        out += ["", f"…and {report.hidden} more in the archived digest."]
    if report.footer:
        out += ["", f"_{md_escape(report.footer)}_"]
    return "\n".join(out).rstrip() + "\n"


def to_text(report: Report) -> str:
    """Plain text for the email's text/plain part."""
    out = [report.title, report.context, ""]
    if report.narrative:
        out += [report.narrative, ""]
    out += [report.narrative_note, ""]
    out += [f"- {f}" for f in report.facts]
    for i, it in enumerate(report.items, 1):
        out.append(f"{i}. {(it.key + ' ') if it.key else ''}{it.title}{(' · ' + it.badge) if it.badge else ''}")
        if it.url:
            out.append(f"   {it.url}")
        out += [f"   - {line}" for line in it.lines]
    if report.hidden:
        out.append(f"…and {report.hidden} more in the archived digest.")
    if report.footer:
        out += ["", report.footer]
    return "\n".join(out).rstrip() + "\n"


def render_all(report: Report) -> dict[str, Any]:
    """Every rendering, as the API returns them and n8n delivers them."""
    return {
        "slack": to_slack(report),
        "email": {"subject": report.title, "html": to_html(report), "text": to_text(report)},
        "markdown": to_markdown(report),
    }
