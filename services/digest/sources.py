"""Where the digest reads from (Jira, Salesforce, Confluence — read-only) and how their failures surface."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator, Mapping

from shared.connectors.confluence import ConfluenceClient
from shared.connectors.http import ConnectorError, RetryPolicy
from shared.connectors.jira import JiraClient
from shared.connectors.salesforce import SalesforceClient
from shared.errors import MetisError
from shared.settings import Secret


class SourceUnavailable(MetisError):
    """A source could not be read (unreachable, 5xx after retries, auth): the job fails, nothing is sent."""

    status, code, title = 502, "source_unavailable", "Source unavailable"


class InvalidQuery(MetisError):
    """The JQL (or SOQL) was rejected by the source: the caller's input, named by field."""

    status, code, title = 400, "invalid_query", "Invalid query"


@dataclass(frozen=True)
class SourceConfig:
    """URLs and credentials of the read-only sources; anything unset means 'not configured'."""

    jira_url: str = ""
    jira_email: str = ""
    jira_token: Secret = Secret("")
    jira_browse_url: str = ""
    salesforce_url: str = ""
    salesforce_client_id: str = ""
    salesforce_client_secret: Secret = Secret("")
    confluence_url: str = ""
    confluence_email: str = ""
    confluence_token: Secret = Secret("")
    retry_attempts: int = 4

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "SourceConfig":
        """METIS_JIRA_URL / _EMAIL / _API_TOKEN, METIS_SALESFORCE_URL / _CLIENT_ID / _CLIENT_SECRET,
        METIS_CONFLUENCE_URL / _EMAIL / _API_TOKEN (Confluence falls back to the Jira credentials)."""
        env = os.environ if env is None else env
        g = lambda k: env.get(k, "").strip()  # noqa: E731
        return cls(
            jira_url=g("METIS_JIRA_URL").rstrip("/"), jira_email=g("METIS_JIRA_EMAIL"),
            jira_token=Secret(g("METIS_JIRA_API_TOKEN")), jira_browse_url=g("METIS_JIRA_BROWSE_URL").rstrip("/"),
            salesforce_url=g("METIS_SALESFORCE_URL").rstrip("/"), salesforce_client_id=g("METIS_SALESFORCE_CLIENT_ID"),
            salesforce_client_secret=Secret(g("METIS_SALESFORCE_CLIENT_SECRET")),
            confluence_url=g("METIS_CONFLUENCE_URL").rstrip("/"),
            confluence_email=g("METIS_CONFLUENCE_EMAIL") or g("METIS_JIRA_EMAIL"),
            confluence_token=Secret(g("METIS_CONFLUENCE_API_TOKEN") or g("METIS_JIRA_API_TOKEN")),
            retry_attempts=int(g("METIS_DIGEST_SOURCE_RETRIES") or 4),
        )


@dataclass
class Sources:
    """Live clients; None where a source is not configured."""

    jira: JiraClient | None
    salesforce: SalesforceClient | None
    confluence: ConfluenceClient | None
    browse_url: str = ""

    @classmethod
    def from_config(cls, cfg: SourceConfig) -> "Sources":
        policy = RetryPolicy(attempts=max(1, cfg.retry_attempts))
        jira = JiraClient(cfg.jira_url, cfg.jira_email, cfg.jira_token.get(), policy=policy) if cfg.jira_url else None
        sf = (SalesforceClient(cfg.salesforce_url, cfg.salesforce_client_id, cfg.salesforce_client_secret.get(),
                               policy=policy) if cfg.salesforce_url else None)
        conf = (ConfluenceClient(cfg.confluence_url, cfg.confluence_email, cfg.confluence_token.get(), policy=policy)
                if cfg.confluence_url else None)
        return cls(jira, sf, conf, cfg.jira_browse_url or cfg.jira_url)

    def require_jira(self) -> JiraClient:
        if self.jira is None:
            raise SourceUnavailable("Jira is not configured (set METIS_JIRA_URL, METIS_JIRA_EMAIL, "
                                    "METIS_JIRA_API_TOKEN)", extra={"source": "jira"})
        return self.jira


def source_error(source: str, exc: ConnectorError, *, query_field: str | None = None) -> MetisError:
    """A connector failure as the job's error: a rejected query is the caller's 400, anything else a 502."""
    if exc.status == 400 and query_field:
        return InvalidQuery(f"{source} rejected {query_field}: {exc}"[:600], extra={"field": query_field,
                                                                                    "source": source.lower()})
    return SourceUnavailable(f"{source}: {exc}"[:600], extra={"source": source.lower(),
                                                             "upstream_status": exc.status})


_ORDER_BY = re.compile(r"\s+ORDER\s+BY\s+.*$", re.IGNORECASE | re.DOTALL)


def jql_and(base: str, *clauses: str, order_by: str | None = None) -> str:
    """`(base) AND clause…` with the base's ORDER BY moved to the end (or replaced by order_by)."""
    m = _ORDER_BY.search(base)
    core, order = (base[:m.start()], m.group(0).strip()) if m else (base, "")
    parts = [f"({core.strip()})"] if core.strip() else []
    parts += [f"({c})" for c in clauses if c]
    jql = " AND ".join(parts)
    order = f"ORDER BY {order_by}" if order_by else order
    return f"{jql} {order}".strip()


def jql_time(dt: datetime) -> str:
    """A JQL date-time literal ("yyyy-MM-dd HH:mm", UTC)."""
    return '"' + dt.strftime("%Y-%m-%d %H:%M") + '"'


def iter_issues(jira: JiraClient, jql: str, fields: list[str], page_size: int,
                *, query_field: str = "jql") -> Iterator[dict[str, Any]]:
    """Every issue of a JQL search; failures become InvalidQuery / SourceUnavailable."""
    try:
        for issue, _token in jira.search(jql, fields=fields, page_size=page_size):
            yield issue
    except ConnectorError as exc:
        raise source_error("Jira", exc, query_field=query_field) from exc
