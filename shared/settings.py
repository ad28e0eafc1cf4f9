"""Typed settings read from the environment once, failing fast with a clear message."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

SERVICE_PORTS: dict[str, int] = {
    "guardrails": 8100,
    "triage": 8101,
    "dedupe": 8102,
    "digest": 8103,
    "watch": 8104,
}


class Secret:
    """A string that never prints itself (repr, str, logs)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


class SettingsError(RuntimeError):
    """Raised at start-up when the environment is incomplete or invalid."""


@dataclass(frozen=True)
class Settings:
    """Everything a service needs from its environment; explicit arguments beat the environment."""

    service: str
    database_url: str
    port: int
    # caller name -> token; a service accepts any of these callers, each with its own token.
    caller_tokens: Mapping[str, Secret] = field(default_factory=dict)
    # this process's own token, sent when it calls another service.
    own_token: Secret = field(default_factory=lambda: Secret(""))
    guardrails_url: str = "http://127.0.0.1:8100"
    dedupe_url: str = "http://127.0.0.1:8102"
    config_dir: str = "config"
    log_level: str = "INFO"
    # Connections per process: gunicorn threads + background loops; keep workers × this under the server's limit.
    db_pool_max: int = 8
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def schema(self) -> str:
        return self.service

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None, **overrides: object) -> "Settings":
        """Read settings for `service`; raise SettingsError listing every problem."""
        env = os.environ if env is None else env
        problems: list[str] = []
        if service not in SERVICE_PORTS:
            problems.append(f"unknown service {service!r}; expected one of {sorted(SERVICE_PORTS)}")
        database_url = env.get("DATABASE_URL", "")
        if not database_url and "database_url" not in overrides:
            problems.append("DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/metis)")
        port_env = f"METIS_{service.upper()}_PORT"
        port = SERVICE_PORTS.get(service, 0)
        if env.get(port_env):
            try:
                port = int(env[port_env])
            except ValueError:
                problems.append(f"{port_env} must be an integer, got {env[port_env]!r}")
        tokens = caller_tokens_from_env(env)
        if not tokens and "caller_tokens" not in overrides:
            problems.append("no METIS_TOKEN_<CALLER> variables are set; every service needs at least one caller")
        for name, secret in tokens.items():
            if len(secret.get()) < 16:
                problems.append(f"METIS_TOKEN_{name.upper()} is shorter than 16 characters")
        pool_max = 8
        if env.get("METIS_DB_POOL_MAX"):
            try:
                pool_max = int(env["METIS_DB_POOL_MAX"])
                if pool_max < 2:
                    raise ValueError
            except ValueError:
                problems.append(f"METIS_DB_POOL_MAX must be an integer >= 2, got {env['METIS_DB_POOL_MAX']!r}")
        level = env.get("METIS_LOG_LEVEL", "INFO").upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            problems.append(f"METIS_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        if problems:
            raise SettingsError("invalid settings for %s:\n  - %s" % (service, "\n  - ".join(problems)))
        values: dict[str, object] = dict(
            service=service,
            database_url=database_url,
            port=port,
            caller_tokens=tokens,
            own_token=tokens.get(service, Secret("")),
            guardrails_url=env.get("METIS_GUARDRAILS_URL", "http://127.0.0.1:8100").rstrip("/"),
            dedupe_url=env.get("METIS_DEDUPE_URL", "http://127.0.0.1:8102").rstrip("/"),
            config_dir=env.get("METIS_CONFIG_DIR", "config"),
            log_level=level,
            db_pool_max=pool_max,
            extra={k: v for k, v in env.items() if k.startswith("METIS_")
                   and not any(s in k for s in ("TOKEN", "KEY", "SECRET", "PASSWORD"))},
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def caller_tokens_from_env(env: Mapping[str, str]) -> dict[str, Secret]:
    """METIS_TOKEN_N8N=... -> {"n8n": Secret(...)}: one token per caller."""
    prefix = "METIS_TOKEN_"
    return {k[len(prefix):].lower(): Secret(v) for k, v in env.items() if k.startswith(prefix) and v}
