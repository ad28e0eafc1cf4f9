"""What each local Metis process is given: database, tokens, service URLs, and where the outside world is.

One place decides the environment of the services and of n8n, used by `make up` and by the test
fixtures alike, so both run the same configuration on different ports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from shared.settings import SERVICE_PORTS, Secret

CALLERS = ("n8n", "ops", "guardrails", "triage", "dedupe", "digest", "watch")
SERVICES = tuple(SERVICE_PORTS)
ANTHROPIC_API_URL = "https://api.anthropic.com"

# Who holds which outside credential. guardrails is the only holder of the Anthropic key and of write
# credentials; the scanners (digest, watch) read Jira / Confluence / Salesforce; triage verifies Jira
# webhook signatures and polls Jira by JQL where webhooks cannot be sent; dedupe verifies the signatures of
# the duplicate flow's Jira webhooks.
SERVICE_SECRETS: dict[str, tuple[str, ...]] = {
    "guardrails": ("ANTHROPIC_API_KEY", "METIS_JIRA_API_TOKEN", "METIS_CONFLUENCE_API_TOKEN",
                   "METIS_SALESFORCE_CLIENT_SECRET", "METIS_SLACK_WEBHOOK_URL"),
    "triage": ("METIS_JIRA_WEBHOOK_SECRET", "METIS_JIRA_API_TOKEN"),  # the token: JQL polling twin (reads only)
    "dedupe": ("METIS_JIRA_WEBHOOK_SECRET",),
    "digest": ("METIS_JIRA_API_TOKEN", "METIS_CONFLUENCE_API_TOKEN", "METIS_SALESFORCE_CLIENT_SECRET"),
    "watch": ("METIS_JIRA_API_TOKEN", "METIS_CONFLUENCE_API_TOKEN", "METIS_SALESFORCE_CLIENT_SECRET"),
}
# Never inherited from the caller's environment: set explicitly per process, or withheld.
_NOT_INHERITED_PREFIXES = ("METIS_TOKEN_", "ANTHROPIC_", "N8N_", "DB_POSTGRESDB_")
_NOT_INHERITED = {"DATABASE_URL", "METIS_JIRA_API_TOKEN", "METIS_JIRA_WEBHOOK_SECRET", "METIS_CONFLUENCE_API_TOKEN",
                  "METIS_SALESFORCE_CLIENT_SECRET", "METIS_SLACK_WEBHOOK_URL"}


def service_urls(ports: Mapping[str, int], host: str = "127.0.0.1") -> dict[str, str]:
    """METIS_<SERVICE>_URL for every service."""
    return {f"METIS_{name.upper()}_URL": f"http://{host}:{port}" for name, port in ports.items()}


@dataclass(frozen=True)
class Externals:
    """The out-of-reach systems (local emulators, or the real ones): public URLs and the secrets for them."""

    public: dict[str, str] = field(default_factory=dict)
    secret: dict[str, Secret] = field(default_factory=dict)
    offline: bool = True  # True when LLM calls go to the local Anthropic emulator


def externals_from_emulators(urls: Mapping[str, Any], creds: Mapping[str, str], *, slack_webhook_url: str = "",
                             real_anthropic_key: str | None = None,
                             real_anthropic_url: str = ANTHROPIC_API_URL) -> Externals:
    """Point everything at the emulators; with a real Anthropic key, LLM calls go to the real API instead.

    `urls` is the emulators' ready file; `creds` holds anthropic_key, jira_user, jira_token,
    jira_webhook_secret, salesforce_client_id, salesforce_client_secret.
    """
    smtp = urls.get("smtp") or {}
    public = {
        "METIS_ANTHROPIC_URL": real_anthropic_url if real_anthropic_key else str(urls["anthropic"]),
        "METIS_JIRA_URL": str(urls.get("jira", "")),
        "METIS_JIRA_EMAIL": creds["jira_user"],
        "METIS_CONFLUENCE_URL": str(urls.get("confluence", "")),
        "METIS_CONFLUENCE_EMAIL": creds["jira_user"],
        "METIS_SALESFORCE_URL": str(urls.get("salesforce", "")),
        "METIS_SALESFORCE_CLIENT_ID": creds["salesforce_client_id"],
        "METIS_SMTP_HOST": str(smtp.get("host", "")),
        "METIS_SMTP_PORT": str(smtp.get("port", "")),
    }
    secret = {
        "ANTHROPIC_API_KEY": Secret(real_anthropic_key or creds["anthropic_key"]),
        "METIS_JIRA_API_TOKEN": Secret(creds["jira_token"]),
        "METIS_JIRA_WEBHOOK_SECRET": Secret(creds["jira_webhook_secret"]),
        # Confluence Cloud accepts the same Atlassian account e-mail + API token as Jira.
        "METIS_CONFLUENCE_API_TOKEN": Secret(creds["jira_token"]),
        "METIS_SALESFORCE_CLIENT_SECRET": Secret(creds["salesforce_client_secret"]),
        # An incoming-webhook URL carries its own secret in its path.
        "METIS_SLACK_WEBHOOK_URL": Secret(slack_webhook_url),
    }
    return Externals(public={k: v for k, v in public.items() if v}, secret=secret, offline=not real_anthropic_key)


def inherited(base: Mapping[str, str]) -> dict[str, str]:
    """The parts of the caller's environment a child may inherit (no tokens, keys or database URLs)."""
    return {k: v for k, v in base.items()
            if not k.startswith(_NOT_INHERITED_PREFIXES) and k not in _NOT_INHERITED}


def service_env(service: str, *, base: Mapping[str, str], database_url: str, tokens: Mapping[str, Secret],
                urls: Mapping[str, str], externals: Externals, config_dir: str) -> dict[str, str]:
    """The environment of one service process: every caller's token (to verify callers and to call others),
    the URLs of its peers and of the outside systems, and only the outside secrets it needs."""
    env = inherited(base)
    env["DATABASE_URL"] = database_url
    env["METIS_CONFIG_DIR"] = config_dir
    env.update(urls)
    env.update(externals.public)
    env.update({f"METIS_TOKEN_{caller.upper()}": token.get() for caller, token in tokens.items()})
    for name in SERVICE_SECRETS.get(service, ()):
        value = externals.secret.get(name)
        if value:
            env[name] = value.get()
    return env


# Service settings that point at an n8n workflow's production webhook, set when that workflow exists:
# variable -> (service, webhook path). guardrails delivers alerts through n8n (Slack, e-mail).
N8N_WEBHOOK_SETTINGS = {"METIS_ALERT_WEBHOOK_URL": ("guardrails", "metis-guardrails-alerts"),
                        # every pending action is handed to the approval workflow, every escalation to its own
                        "METIS_APPROVAL_WEBHOOK_URL": ("guardrails", "metis-approval-request"),
                        "METIS_ESCALATION_WEBHOOK_URL": ("guardrails", "metis-escalation")}


def n8n_webhook_env(service: str, n8n_url: str, paths: set[str]) -> dict[str, str]:
    """The N8N_WEBHOOK_SETTINGS of one service whose workflows are present."""
    return {var: f"{n8n_url}/webhook/{path}" for var, (svc, path) in N8N_WEBHOOK_SETTINGS.items()
            if svc == service and path in paths}


# Site settings workflows read with $env (overridable from the environment of `make up`).
WORKFLOW_SETTINGS = {"METIS_ALERT_EMAIL_FROM": "metis@example.com", "METIS_ALERT_EMAIL_TO": "ops@example.com",
                     "METIS_APPROVAL_EMAIL_TO": "approvers@example.com"}


def workflow_env(urls: Mapping[str, str], externals: Externals,
                 base: Mapping[str, str] | None = None) -> dict[str, str]:
    """What n8n workflows may read with $env: service and outside-system URLs and site settings,
    never a token or key.

    The Slack incoming-webhook URL is the one secret-bearing URL n8n gets this way: n8n delivers the
    alerts, and only n8n's own environment holds it (never a workflow file)."""
    env = {k: (base or {}).get(k, default) for k, default in WORKFLOW_SETTINGS.items()}
    env.update(urls)
    env.update({k: v for k, v in externals.public.items() if k.endswith("_URL") or k.startswith("METIS_SMTP_")})
    slack = externals.secret.get("METIS_SLACK_WEBHOOK_URL")
    if slack:
        env["METIS_SLACK_WEBHOOK_URL"] = slack.get()
    return env
