"""The `python -m emulators` process: ready file, demo seed, clean SIGTERM."""
from __future__ import annotations

import json
import time
from pathlib import Path

import requests

from tests.fixtures.emulators import start_emulators, stop_emulators


def test_start_seed_demo_and_sigterm(tmp_path: Path) -> None:
    t0 = time.monotonic()
    emus = start_emulators(tmp_path, seed_demo=True)
    started = time.monotonic() - t0
    try:
        ready = json.loads((tmp_path / "emulators-ready.json").read_text())
        assert set(ready) >= {"anthropic", "jira", "slack", "smtp", "mail", "confluence", "salesforce"}
        assert ready["smtp"]["port"] == emus.smtp_port and ready["jira"].startswith("http://127.0.0.1:")
        for url in emus.http_urls.values():
            assert requests.get(url + "/_emulator/health", timeout=5).json()["ok"] is True
        issues = emus.jira_state()["issues"]
        assert len(issues) >= 5 and any(i["fields"]["priority"]["name"] == "Blocker" for i in issues.values())
        pages = requests.get(emus.confluence_url + "/_emulator/confluence/state", timeout=5).json()["pages"]
        assert any("payroll configuration" in p["title"] for p in pages.values())
        records = requests.get(emus.salesforce_url + "/_emulator/salesforce/state", timeout=5).json()["records"]
        assert len(records["Account"]) >= 3
        assert started < 3.0, f"start-up took {started:.2f}s"
    finally:
        stop_emulators(emus)
    assert emus.process.returncode == 0
    assert not (tmp_path / "emulators-ready.json").exists()
