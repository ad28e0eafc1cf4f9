"""`metis` commands of guardrails: kill switch, audit verify / export, policy check / reload.

They talk to PostgreSQL directly (DATABASE_URL), so ops can stop everything even when no guardrails
process answers, and they go through the same service functions (and audit entries) as the API.
"""
from __future__ import annotations

import getpass
import json
import sys
from datetime import datetime
from zoneinfo import ZoneInfo
from typing import Any

import click
import psycopg
from psycopg.rows import dict_row

from shared import db

from . import repository as repo
from . import service
from .policy import PolicyError, load_policy

_DB = click.option("--database-url", envvar="DATABASE_URL", required=True, help="PostgreSQL URL (env DATABASE_URL).")


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, row_factory=dict_row)


@click.group("kill-switch")
def kill_switch() -> None:
    """Stop (or allow again) every new run, LLM call and heartbeat-driven job."""


@kill_switch.command("engage")
@click.option("--reason", required=True, help="Why (recorded in the audit log and sent to ops).")
@click.option("--actor", default=lambda: getpass.getuser(), show_default="current user", help="Who.")
@_DB
def engage(reason: str, actor: str, database_url: str) -> None:
    """Engage the kill switch: refused everywhere from the next request on; survives restarts."""
    with _connect(database_url) as conn, conn.transaction():
        state = service.set_kill_switch(conn=conn, engaged=True, actor=actor, reason=reason, caller="cli")
    click.echo(f"kill switch ENGAGED by {state['actor']}: {state['reason']}")


@kill_switch.command("release")
@click.option("--reason", required=True, help="Why it is safe again.")
@click.option("--actor", default=lambda: getpass.getuser(), show_default="current user", help="Who.")
@_DB
def release(reason: str, actor: str, database_url: str) -> None:
    """Release the kill switch."""
    with _connect(database_url) as conn, conn.transaction():
        service.set_kill_switch(conn=conn, engaged=False, actor=actor, reason=reason, caller="cli")
    click.echo("kill switch released")


@kill_switch.command("status")
@_DB
def status(database_url: str) -> None:
    """Print the kill switch state; exit 3 while engaged."""
    with _connect(database_url) as conn:
        state = service.kill_switch_state(conn)
    if state["engaged"]:
        click.echo(f"ENGAGED by {state['actor']} at {state['changed_at']}: {state['reason']}")
        sys.exit(3)
    click.echo("released")


@click.group("audit")
def audit() -> None:
    """The append-only, hash-chained audit log."""


@audit.command("verify")
@_DB
def verify(database_url: str) -> None:
    """Recompute the whole chain; exit 1 and name the first broken link if any entry was edited or deleted."""
    with _connect(database_url) as conn, conn.transaction():
        result = service.verify_audit(conn)
    if result.ok:
        click.echo(f"audit chain OK: {result.checked} entries, head at {result.head_seq}")
        return
    click.echo(f"audit chain BROKEN at entry {result.first_broken_seq}: {result.problem} "
               f"({result.checked} entries verified before it)", err=True)
    sys.exit(1)


@audit.command("export")
@click.option("--run-id", default=None)
@click.option("--task", default=None)
@click.option("--kind", default=None, help="Exact kind, or a prefix ending in '*'.")
@_DB
def export(run_id: str | None, task: str | None, kind: str | None, database_url: str) -> None:
    """Write matching entries as NDJSON to stdout."""
    with _connect(database_url) as conn, conn.transaction():
        rows = repo.audit_query(conn, run_id=run_id, task=task, kind=kind, since=None, until=None, after_seq=None,
                                limit=None)
        for line in service.iter_ndjson(rows):
            sys.stdout.write(line)


@click.group("policy")
def policy() -> None:
    """config/policy.yaml and config/prices.yaml."""


@policy.command("check")
@click.option("--config-dir", envvar="METIS_CONFIG_DIR", default="config", show_default=True)
def check(config_dir: str) -> None:
    """Validate the files; print every error by path and exit 1 if any."""
    try:
        p = load_policy(config_dir)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for line in p.retirement_warnings(datetime.now(ZoneInfo(p.timezone)).date()):
        click.echo(f"warning: {line}", err=True)
    click.echo(f"policy OK ({len(p.tasks)} tasks, {len(p.prices)} priced models, digest {p.digest[:12]})")


@policy.command("reload")
@click.option("--config-dir", envvar="METIS_CONFIG_DIR", default="config", show_default=True)
@click.option("--actor", default=lambda: getpass.getuser(), show_default="current user")
@_DB
def reload(config_dir: str, actor: str, database_url: str) -> None:
    """Validate and record the files as the policy in force; every worker and replica picks it up within ~1 s."""
    try:
        p = load_policy(config_dir)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    pool = db.make_pool(database_url, min_size=1, max_size=1, name="metis-cli")
    pool.open()
    try:
        result = service.PolicyStore(pool, p).record(p, actor=f"cli:{actor}")
    finally:
        pool.close()
    if result["changed"]:
        click.echo(f"policy version {result['version']} recorded; changed: {json.dumps(result['changes'][:20])}")
    else:
        click.echo(f"policy unchanged (version {result['version']})")


commands = [kill_switch, audit, policy]
