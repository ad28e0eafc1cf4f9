"""Connectors: signature checks on real vectors, ADF, and Retry-After honoured against a real HTTP server."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import requests

from shared.connectors.adf import adf_to_text, is_adf, text_to_adf
from shared.connectors.http import ConnectorError, RetryPolicy, request_with_retries, retry_after_seconds
from shared.signatures import verify_jira_signature, verify_slack_signature

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "data" / "fixtures"


def test_slack_signature_matches_slacks_own_vector():
    v = json.loads((FIXTURES / "slack" / "request_signing_test_vector.json").read_text())
    ts, sig = v["headers"]["X-Slack-Request-Timestamp"], v["headers"]["X-Slack-Signature"]
    body = v["raw_body"].encode()
    assert verify_slack_signature(v["signing_secret"], ts, body, sig, now=int(ts))
    assert not verify_slack_signature(v["signing_secret"], ts, body + b"x", sig, now=int(ts))
    assert not verify_slack_signature("wrong-secret", ts, body, sig, now=int(ts))
    # Replays older than five minutes are refused even with a valid signature.
    assert not verify_slack_signature(v["signing_secret"], ts, body, sig, now=int(ts) + 301)


def test_jira_signature():
    body = (FIXTURES / "jira-webhooks" / "mattermost_jira_issue_created.json").read_bytes()
    good = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert verify_jira_signature("s3cret", body, good)
    assert not verify_jira_signature("s3cret", body[:-1], good)
    assert not verify_jira_signature("s3cret", body, None)
    assert not verify_jira_signature("s3cret", body, good.replace("sha256=", "sha1="))


def test_adf_round_trip_keeps_text_as_text():
    text = "First line\nsecond line\n\n<b>not markup</b> *nor this*"
    doc = text_to_adf(text)
    assert is_adf(doc)
    assert doc["content"][0]["content"][1] == {"type": "hardBreak"}
    assert adf_to_text(doc) == "First line\nsecond line\n<b>not markup</b> *nor this*\n"
    fixture = json.loads((FIXTURES / "jira-rest-v3" / "add_comment_request_adf.json").read_text())
    assert is_adf(fixture["body"]) and adf_to_text(fixture["body"]).strip()


def test_retry_after_parsing():
    assert retry_after_seconds("3", 1.0) == 3.0
    assert retry_after_seconds(None, 1.5) == 1.5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 2.0) == 0.0


class _Flaky(BaseHTTPRequestHandler):
    script: list[tuple[int, dict[str, str]]] = []
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        _Flaky.seen.append(self.path)
        status, headers = _Flaky.script.pop(0) if _Flaky.script else (200, {})
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    _Flaky.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_retries_honour_retry_after(flaky_server):
    _Flaky.script = [(429, {"Retry-After": "2"}), (503, {"Retry-After": "1"}), (200, {})]
    slept: list[float] = []
    resp = request_with_retries(requests.Session(), "GET", flaky_server + "/x", policy=RetryPolicy(),
                                sleep=slept.append)
    assert resp.status_code == 200
    assert slept == [2.0, 1.0]
    assert len(_Flaky.seen) == 3


def test_retry_budget_is_bounded(flaky_server):
    _Flaky.script = [(429, {"Retry-After": "120"})]
    with pytest.raises(ConnectorError, match="retry budget"):
        request_with_retries(requests.Session(), "GET", flaky_server + "/x",
                             policy=RetryPolicy(budget_seconds=60), sleep=lambda s: None)


def test_client_errors_are_not_retried(flaky_server):
    _Flaky.script = [(400, {})]
    resp = request_with_retries(requests.Session(), "GET", flaky_server + "/x", policy=RetryPolicy(),
                                sleep=lambda s: pytest.fail("must not sleep"))
    assert resp.status_code == 400 and len(_Flaky.seen) == 1
