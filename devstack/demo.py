"""Demo data for `make up`: what a fresh local stack shows.

The emulators load demo Jira tickets, Confluence pages and Salesforce accounts themselves
(`--seed-demo`); later features add their own loaders here (e.g. back-filling the ticket index).
"""
from __future__ import annotations

from typing import Callable, Mapping

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
