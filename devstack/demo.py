"""Demo data for `make up`: what a fresh local stack shows.

The emulators load demo Jira tickets, Confluence pages and Salesforce accounts themselves
(`--seed-demo`); later features add their own loaders here (e.g. back-filling the ticket index).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import requests

from shared.settings import Secret

from .stack import Externals

# Each loader gets the service URLs, the outside systems and the ops token, and returns one summary line.
Loader = Callable[[Mapping[str, str], Externals, Secret], str]
LOADERS: list[Loader] = []


def load(*, urls: Mapping[str, str], externals: Externals, ops_token: Secret) -> list[str]:
    """Run every demo loader; returns what was loaded, one line each."""
    lines = ["emulators: demo Jira tickets, Confluence pages, Salesforce accounts"]
    lines += [loader(urls, externals, ops_token) for loader in LOADERS]
    return lines


# The n8n flows that Jira feeds with `jira:issue_created` (their Webhook nodes' paths).
JIRA_FLOW_WEBHOOKS = ("metis-triage-jira", "metis-dedupe-jira")


def wire_jira_webhooks(jira_url: str, n8n_url: str, paths: Sequence[str] = JIRA_FLOW_WEBHOOKS) -> str:
    """Subscribe n8n's Jira flows to the Jira emulator's `jira:issue_created`, as a Jira admin does once in Jira's
    settings: signed with the emulator's webhook secret (the one the services verify) and delivered
    asynchronously with retries, like Jira Cloud. Creating a ticket in the emulator then triggers triage and the
    duplicate check end to end. Returns one summary line."""
    for path in paths:
        r = requests.post(f"{jira_url}/_emulator/jira/webhooks", timeout=10,
                          json={"url": f"{n8n_url}/webhook/{path}", "events": ["jira:issue_created"], "async": True})
        r.raise_for_status()
    return "Jira emulator: jira:issue_created → n8n " + ", ".join(f"/webhook/{p}" for p in paths) + " (signed)"
