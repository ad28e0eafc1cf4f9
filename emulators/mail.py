"""SMTP emulator (aiosmtpd) that records every message, and the HTTP inbox that shows them.

Any AUTH PLAIN / LOGIN is accepted without TLS (so SMTP credentials in n8n work); the login name is
recorded, the password never. `GET /_emulator/mail/messages` returns parsed messages: envelope from / to,
subject, text and HTML parts, headers and the links found in the bodies.
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from flask import Flask, Response, jsonify

from emulators.common import Recorder

LINK_RE = re.compile(r"https?://[^\s\"'<>)]+")


class Inbox(Recorder):
    """Parsed messages received over SMTP."""


def parse_message(raw: bytes, mail_from: str, rcpt_tos: list[str], login: str | None) -> dict[str, Any]:
    """The recorded form of one message."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    text = html = None
    try:
        part = msg.get_body(preferencelist=("plain",))
        text = part.get_content() if part is not None else None
        part = msg.get_body(preferencelist=("html",))
        html = part.get_content() if part is not None else None
    except (KeyError, LookupError):
        text = raw.decode("utf-8", "replace")
    links = sorted(set(LINK_RE.findall((text or "") + "\n" + (html or ""))))
    return {"mail_from": mail_from, "rcpt_tos": list(rcpt_tos), "from": str(msg.get("From", "")),
            "to": str(msg.get("To", "")), "cc": str(msg.get("Cc", "")), "subject": str(msg.get("Subject", "")),
            "message_id": str(msg.get("Message-ID", "")), "text": text, "html": html, "links": links,
            "headers": {k: str(v) for k, v in msg.items()}, "auth_login": login, "size": len(raw)}


class _Handler:
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode()
        login = session.auth_data.decode() if isinstance(session.auth_data, bytes) else session.auth_data
        self.inbox.add(parse_message(raw, str(envelope.mail_from), list(envelope.rcpt_tos), login))
        return "250 Message accepted for delivery"


def _accept_any(server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
    login = getattr(auth_data, "login", None)
    return AuthResult(success=True, auth_data=login)


@dataclass
class SmtpServer:
    """A running SMTP listener on its own event-loop thread."""

    port: int
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    server: asyncio.base_events.Server

    def stop(self) -> None:
        async def _close() -> None:
            self.server.close()
            await self.server.wait_closed()

        fut = asyncio.run_coroutine_threadsafe(_close(), self.loop)
        try:
            fut.result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def start_smtp(inbox: Inbox, host: str, port: int) -> SmtpServer:
    """Listen for SMTP on host:port (0 = any free port) and record into `inbox`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.setblocking(False)
    loop = asyncio.new_event_loop()
    handler = _Handler(inbox)

    def factory() -> SMTP:
        return SMTP(handler, hostname="smtp.emulator.local", loop=loop, auth_required=False, auth_require_tls=False,
                    authenticator=_accept_any, enable_SMTPUTF8=True)

    server = loop.run_until_complete(loop.create_server(factory, sock=sock))
    thread = threading.Thread(target=loop.run_forever, name="emu-smtp", daemon=True)
    thread.start()
    return SmtpServer(int(sock.getsockname()[1]), loop, thread, server)


def create_app(inbox: Inbox) -> Flask:
    """The HTTP side of the mail emulator: the recorded inbox."""
    app = Flask("emulators.mail")

    @app.get("/_emulator/mail/messages")
    def messages() -> Response:
        return jsonify({"messages": inbox.all()})

    @app.post("/_emulator/reset")
    def reset() -> Response:
        inbox.clear()
        return jsonify({"ok": True})

    @app.get("/_emulator/health")
    def health() -> Response:
        return jsonify({"ok": True, "emulator": "mail"})

    @app.get("/")
    def index() -> Response:
        return jsonify({"messages": len(inbox.all()), "see": "/_emulator/mail/messages"})

    return app
