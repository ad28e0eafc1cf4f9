"""`metis dedupe ...`: back-fill from Jira, evaluate through the HTTP API."""
from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm


@click.group("dedupe")
def dedupe() -> None:
    """Duplicate detection: back-fill the index, evaluate quality."""


@dedupe.command("backfill")
@click.option("--jql", required=True, help="Which issues, e.g. 'project = PAY ORDER BY created ASC'.")
@click.option("--name", default="default", show_default=True, help="Cursor name (one per back-fill).")
@click.option("--page-size", default=100, show_default=True, type=click.IntRange(1, 5000))
@click.option("--restart", is_flag=True, help="Forget the saved cursor and start from the first page.")
@click.option("--client-field", default=None, help="Custom field holding the client (e.g. customfield_10050).")
@click.option("--jira-url", envvar="METIS_JIRA_URL", required=True, help="Env METIS_JIRA_URL.")
@click.option("--jira-email", envvar="METIS_JIRA_EMAIL", required=True, help="Env METIS_JIRA_EMAIL.")
@click.option("--database-url", envvar="DATABASE_URL", required=True, help="Env DATABASE_URL.")
def backfill_cmd(jql: str, name: str, page_size: int, restart: bool, client_field: str | None, jira_url: str,
                 jira_email: str, database_url: str) -> None:
    """Page through a Jira JQL search and index every issue; rerun to resume where it stopped."""
    from shared import db

    from shared.connectors.http import ConnectorError
    from shared.connectors.jira import JiraClient

    from .backfill import backfill
    from .config import load_config
    from .service import Engine, ModelHolder
    from shared.embeddings import CachingEmbedder, make_embedder

    token = os.environ.get("METIS_JIRA_API_TOKEN", "")
    if not token:
        raise click.UsageError("METIS_JIRA_API_TOKEN is not set (Jira API token for Basic auth)")
    db.migrate(database_url, "dedupe")
    config = load_config(os.environ.get("METIS_CONFIG_DIR", "config"))
    pool = db.make_pool(database_url, name="dedupe-backfill", max_size=2)
    pool.open()
    try:
        engine = Engine(config=config, pool=pool,
                        model=ModelHolder(lambda: CachingEmbedder(make_embedder(config.embedding))))
        engine.model.load()
        engine.model.get()
        with tqdm(unit="ticket", desc=f"back-fill {name}") as bar:
            try:
                result = backfill(engine=engine, jira=JiraClient(jira_url, jira_email, token), jql=jql, name=name,
                                  page_size=page_size, restart=restart, client_field=client_field,
                                  progress=bar.update)
            except ConnectorError as exc:
                raise click.ClickException(f"{exc}; the pages stored so far are kept: run the same command "
                                           "again to resume from there") from exc
    finally:
        pool.close()
    click.echo(json.dumps(result))


@dedupe.command("evaluate")
@click.option("--issues", "issues_csv", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--pairs", "pairs_csv", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", default=None, help="A running dedupe service; default: start one under gunicorn.")
@click.option("--token-env", default="METIS_TOKEN_OPS", show_default=True,
              help="Env var holding the bearer token for --url.")
@click.option("--database-url", envvar="DATABASE_URL", default=None, help="For the started service (env DATABASE_URL).")
@click.option("--workers", default=2, show_default=True, help="gunicorn workers of the started service.")
@click.option("--concurrency", default=2, show_default=True, help="Index batches in flight at once.")
@click.option("--negatives", default=None, type=int, help="Query only this many no-duplicate reports (default all).")
@click.option("--calibrate", is_flag=True, help="Also derive verdict thresholds from the development split.")
@click.option("--llm", is_flag=True,
              help="Verify with the LLM through guardrails, as the n8n flow does: one guardrails run per query (task "
                   "dedupe); the service started here gets verification on. Needs --guardrails-url, a guardrails "
                   "token (--guardrails-token-env) and, for the started service, METIS_TOKEN_DEDUPE.")
@click.option("--guardrails-url", envvar="METIS_GUARDRAILS_URL", default=None, help="With --llm (env METIS_GUARDRAILS_URL).")
@click.option("--guardrails-token-env", default="METIS_TOKEN_OPS", show_default=True,
              help="With --llm: env var holding a guardrails bearer token that may open runs.")
@click.option("--keep", is_flag=True, help="Leave the evaluation tickets in the index.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False, path_type=Path))
def evaluate_cmd(issues_csv: Path, pairs_csv: Path, url: str | None, token_env: str, database_url: str | None,
                 workers: int, concurrency: int, negatives: int | None, calibrate: bool, llm: bool,
                 guardrails_url: str | None, guardrails_token_env: str, keep: bool, json_out: Path | None) -> None:
    """Recall-rate@1/5/10, MAP and verdict precision/recall, time-ordered, through the HTTP API."""
    rep = run_evaluation(issues_csv=issues_csv, pairs_csv=pairs_csv, url=url, token=os.environ.get(token_env),
                         database_url=database_url, workers=workers, concurrency=concurrency,
                         negatives=negatives, calibrate_=calibrate, llm=llm, guardrails_url=guardrails_url,
                         guardrails_token=os.environ.get(guardrails_token_env),
                         keep=keep, show_progress=True)
    from .evaluation import markdown

    click.echo(markdown(rep))
    if json_out:
        json_out.write_text(json.dumps(rep, indent=2, default=str))


def run_evaluation(*, issues_csv: Path, pairs_csv: Path, url: str | None, token: str | None,
                   database_url: str | None, workers: int = 1, concurrency: int = 1,
                   negatives: int | None = None,
                   calibrate_: bool = False, keep: bool = False, show_progress: bool = False,
                   extra_env: dict[str, str] | None = None, llm: bool = False, guardrails_url: str | None = None,
                   guardrails_token: str | None = None, project: str | None = None) -> dict[str, Any]:
    """Start (or reach) the service, index the CSV under a private project, query, report, clean up."""
    try:
        from devstack.processes import free_port, start_service, wait_http
    except ModuleNotFoundError:  # devstack lives beside services/ in the repo but is not an installed package
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from devstack.processes import free_port, start_service, wait_http

    from .config import copy_with_llm_enabled
    from .evaluation import Client, GuardrailsRuns, calibrate, index_dataset, load_dataset, report, run_queries

    runs = None
    if llm:
        if not guardrails_url or not guardrails_token:
            raise click.UsageError("--llm needs --guardrails-url (or METIS_GUARDRAILS_URL) and a guardrails token "
                                   "(--guardrails-token-env)")
        runs = GuardrailsRuns(guardrails_url, guardrails_token)
    project = project or "EVAL" + secrets.token_hex(3).upper()
    # Keys carry the run's project so a rerun embeds afresh (honest timing) and never touches real tickets.
    data = load_dataset(issues_csv, pairs_csv, prefix=project)
    proc = None
    tmp = None
    if url is None:
        if not database_url:
            raise click.UsageError("give --url, or --database-url / DATABASE_URL to start a service")
        token = "eval-" + secrets.token_hex(16)
        tmp = tempfile.TemporaryDirectory(prefix="metis-dedupe-eval-")
        env = {**os.environ, "DATABASE_URL": database_url, "METIS_TOKEN_OPS": token, **(extra_env or {})}
        if llm:
            if not env.get("METIS_TOKEN_DEDUPE"):
                raise click.UsageError("--llm: the started service calls the gateway as caller dedupe; set "
                                       "METIS_TOKEN_DEDUPE (e.g. from .run/tokens.env), or give --url")
            # The same configuration with verification switched on, in a directory of the run's own.
            source = Path(env.get("METIS_CONFIG_DIR") or Path(__file__).resolve().parents[2] / "config")
            config_dir = copy_with_llm_enabled(source, Path(tmp.name) / "config")
            env.update(METIS_CONFIG_DIR=str(config_dir), METIS_DEDUPE_LLM="on", METIS_GUARDRAILS_URL=str(guardrails_url))
        port = free_port()
        proc = start_service("dedupe", env=env, port=port, log_dir=Path(tmp.name), workers=workers)
        wait_http(proc, "/readyz", timeout=180)
        url = proc.url
    if not token:
        raise click.UsageError("no bearer token for --url (see --token-env)")
    client = Client(url, token)
    try:
        with tqdm(total=len(data.tickets), unit="ticket", desc="index", disable=not show_progress,
                  file=sys.stderr) as bar:
            stats = index_dataset(client, data, project, concurrency=concurrency, progress=bar.update)
        n_q = len(data.queries) + (negatives if negatives is not None else len(data.negatives))
        with tqdm(total=n_q, unit="query", desc="query", disable=not show_progress, file=sys.stderr) as bar:
            results = run_queries(client, data, project, negatives=negatives, progress=bar.update, runs=runs)
        calibrated = None
        if calibrate_:
            # The fitted weights belong to the vectors they were fitted on: record whose (verdict.embedder).
            calibrated = {**calibrate(results), "embedder": client.get("/v1/index")["embedder"]}
        return report(stats, results, calibrated, llm=llm, llm_refusals=runs.refusals if runs else None)
    finally:
        if not keep:
            for t in data.tickets:
                client.delete(f"/v1/tickets/{t['key']}")
        if proc is not None:
            proc.stop()
        if tmp is not None:
            tmp.cleanup()


commands = [dedupe]
