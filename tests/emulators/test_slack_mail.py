"""Slack incoming webhooks with `requests`, SMTP with `smtplib`."""
from __future__ import annotations

import json
import smtplib
from email.message import EmailMessage
from pathlib import Path

import requests

from tests.fixtures.emulators import Emulators

FIXTURES = Path("/work/shared/data/fixtures/slack")


def test_block_kit_messages_are_accepted_and_recorded(emu: Emulators) -> None:
    url = emu.slack_webhook_url()
    buttons = json.loads((FIXTURES / "incoming_webhook_actions_buttons.json").read_text())
    templated = (FIXTURES / "incoming_webhook_section_url_button.templated.json").read_text()
    templated = templated.replace("${{ github.sha }}", "abc123").replace("${{ github.payload.repository.full_name }}", "o/r")
    templated = templated.replace("${{ github.runId }}", "42").replace("${{ env.SLACK_CHANNEL_ID }}", "C0123")
    for body in (buttons, json.loads(templated), {"text": "plain text only"}):
        r = requests.post(url, json=body, timeout=5)
        assert (r.status_code, r.text) == (200, "ok")
    msgs = emu.slack_messages()
    assert len(msgs) == 3 and msgs[0]["blocks"][2]["elements"][0]["value"] == "create_task"
    assert msgs[1]["blocks"][0]["accessory"]["url"] == "https://github.com/o/r/actions/runs/42"
    assert msgs[2]["text"] == "plain text only" and msgs[0]["channel"] == "B000OPS"


def test_slack_errors(emu: Emulators) -> None:
    url = emu.slack_webhook_url()
    cases = [
        (b"{not json", 400, "invalid_payload"),
        (json.dumps([1, 2]).encode(), 400, "invalid_payload"),
        (json.dumps({"username": "bot"}).encode(), 400, "no_text"),
        (json.dumps({"text": "x", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "y" * 3001}}]}).encode(), 400, "invalid_blocks"),
        (json.dumps({"text": "x", "blocks": [{"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "z" * 76}, "url": "https://e.x"}]}]}).encode(), 400, "invalid_blocks"),
        (json.dumps({"text": "x", "blocks": [{"type": "nonsense"}]}).encode(), 400, "invalid_blocks"),
    ]
    for data, status, text in cases:
        r = requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=5)
        assert (r.status_code, r.text) == (status, text), data[:60]
    r = requests.post(emu.slack_url + "/services/nope", json={"text": "x"}, timeout=5)
    assert (r.status_code, r.text) == (404, "no_service")
    requests.post(emu.slack_url + "/_emulator/slack/revoke", json={"hook": url}, timeout=5).raise_for_status()
    assert requests.post(url, json={"text": "x"}, timeout=5).status_code == 404
    assert emu.slack_messages() == []


def test_slack_form_encoded_and_faults(emu: Emulators) -> None:
    url = emu.slack_webhook_url(secret="abcdefgh12345678")
    r = requests.post(url, data={"payload": json.dumps({"text": "legacy form"})}, timeout=5)
    assert (r.status_code, r.text) == (200, "ok")
    requests.post(emu.slack_url + "/_emulator/slack/faults", json={"path": "/services/*", "status": 429, "retry_after": "2"},
                  timeout=5).raise_for_status()
    limited = requests.post(url, json={"text": "x"}, timeout=5)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "2" and limited.text == "rate_limited"
    assert requests.post(url, json={"text": "after"}, timeout=5).text == "ok"
    assert [m["text"] for m in emu.slack_messages()] == ["legacy form", "after"]


def test_smtp_records_parsed_messages(emu: Emulators) -> None:
    msg = EmailMessage()
    msg["From"] = "Metis <metis@example.com>"
    msg["To"] = "approver@example.com"
    msg["Subject"] = "Approve: add comment to SUP-12"
    msg.set_content("Open https://n8n.local/form/approve?id=7 to decide.")
    msg.add_alternative('<p>Open <a href="https://n8n.local/form/approve?id=7">the form</a>.</p>', subtype="html")
    with smtplib.SMTP(emu.smtp_host, emu.smtp_port, timeout=5) as smtp:
        smtp.ehlo()
        smtp.login("metis-mailer", "not-recorded-password")
        smtp.send_message(msg, to_addrs=["approver@example.com", "audit@example.com"])
    got = emu.mail_messages()
    assert len(got) == 1
    m = got[0]
    assert m["subject"] == "Approve: add comment to SUP-12" and m["mail_from"] == "metis@example.com"
    assert m["rcpt_tos"] == ["approver@example.com", "audit@example.com"]
    assert "to decide" in m["text"] and '<a href="https://n8n.local/form/approve?id=7">' in m["html"]
    assert m["links"] == ["https://n8n.local/form/approve?id=7"]
    assert m["auth_login"] == "metis-mailer" and "not-recorded-password" not in json.dumps(got)


def test_smtp_without_auth_and_plain_text(emu: Emulators) -> None:
    with smtplib.SMTP(emu.smtp_host, emu.smtp_port, timeout=5) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], "Subject: hi\r\n\r\nplain body\r\n")
    m = emu.mail_messages()[0]
    assert m["subject"] == "hi" and m["text"].strip() == "plain body" and m["html"] is None and m["auth_login"] is None
