"""The `metis` command line: migrate, status, and what each service adds (kill switch, audit, evaluations...)."""
from __future__ import annotations

import importlib
import os
import sys

import click
import requests

from .db import migrate as run_migrations
from .settings import SERVICE_PORTS

SERVICES = tuple(SERVICE_PORTS)


@click.group()
def main() -> None:
    """Metis: unattended AI operations with guardrails."""


@main.command()
@click.option("--service", "services", multiple=True, type=click.Choice(SERVICES),
              help="Only these services (default: all).")
@click.option("--database-url", envvar="DATABASE_URL", required=True, help="PostgreSQL URL (env DATABASE_URL).")
def migrate(services: tuple[str, ...], database_url: str) -> None:
    """Apply pending migrations, one schema per service; safe to run twice."""
    for name in services or SERVICES:
        applied = run_migrations(database_url, name)
        click.echo(f"{name}: {'applied ' + ', '.join(applied) if applied else 'up to date'}")


@main.command()
def status() -> None:
    """Health and readiness of every service at its configured URL."""
    bad = False
    for name, port in SERVICE_PORTS.items():
        base = os.environ.get(f"METIS_{name.upper()}_URL", f"http://127.0.0.1:{port}")
        try:
            r = requests.get(f"{base}/readyz", timeout=3)
            state = "ready" if r.status_code == 200 else f"not ready ({r.json().get('checks')})"
            bad |= r.status_code != 200
        except requests.RequestException as exc:
            state, bad = f"down ({type(exc).__name__})", True
        click.echo(f"{name:<11} {base:<26} {state}")
    sys.exit(1 if bad else 0)


def _load_service_commands() -> None:
    """Services contribute sub-commands through an optional `cli` module exposing `commands`."""
    for name in SERVICES:
        try:
            mod = importlib.import_module(f"services.{name}.cli")
        except ModuleNotFoundError as exc:
            if exc.name != f"services.{name}.cli":
                raise
            continue
        for cmd in getattr(mod, "commands", []):
            main.add_command(cmd)


_load_service_commands()

if __name__ == "__main__":
    main()
