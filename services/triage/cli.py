"""`metis triage ...` commands: the offline classifier's evaluation on a labelled CSV."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .config import load_taxonomy, load_triage_config
from .evaluate import DedupeHttp, evaluate, iter_columns, render


@click.group("triage")
def triage() -> None:
    """Triage service commands."""


@triage.command("evaluate")
@click.option("--csv", "csv_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Labelled CSV (one ticket per row).")
@click.option("--text-columns", required=True, help="Comma-separated: the first is the summary, the rest the description.")
@click.option("--label-column", required=True, help="The column to predict (e.g. Priority).")
@click.option("--key-column", default=None, help="Unique id column (default: row number).")
@click.option("--created-column", default=None, help="Creation time column; neighbours must be older (default: file order).")
@click.option("--status-column", default=None, help="Status column (so /v1/similar sees only resolved tickets).")
@click.option("--resolution-column", default=None, help="Resolution column (empty = unresolved).")
@click.option("--field", type=click.Choice(["priority", "label"]), default=None,
              help="Which ticket field carries the label (default: priority for a 'Priority' column).")
@click.option("--test-fraction", default=0.2, show_default=True, type=click.FloatRange(0.05, 0.5))
@click.option("--dev-fraction", default=0.2, show_default=True, type=click.FloatRange(0.05, 0.5))
@click.option("--no-tune", is_flag=True, help="Only score the configured vote parameters.")
@click.option("--keep-index", is_flag=True, help="Leave the evaluation tickets in dedupe afterwards.")
@click.option("--dedupe-url", envvar="METIS_DEDUPE_URL", default="http://127.0.0.1:8102", show_default=True)
@click.option("--config-dir", envvar="METIS_CONFIG_DIR", default="config", show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full result as JSON.")
def evaluate_cmd(csv_path: Path, text_columns: str, label_column: str, key_column: str | None,
                 created_column: str | None, status_column: str | None, resolution_column: str | None,
                 field: str | None, test_fraction: float, dev_fraction: float, no_tune: bool, keep_index: bool,
                 dedupe_url: str, config_dir: str, json_out: Path | None) -> None:
    """Accuracy, macro-F1 and the confusion matrix of the offline classifier (through dedupe's HTTP API)."""
    token = os.environ.get("METIS_TOKEN_TRIAGE") or os.environ.get("METIS_TOKEN_OPS")
    if not token:
        raise click.UsageError("set METIS_TOKEN_TRIAGE (or METIS_TOKEN_OPS): dedupe needs a bearer token")
    taxonomy = load_taxonomy(Path(config_dir) / "taxonomy.yaml")
    cfg = load_triage_config(Path(config_dir) / "triage.yaml", taxonomy)
    try:
        result = evaluate(csv_path=csv_path, text_columns=list(iter_columns(text_columns)), label_column=label_column,
                          dedupe=DedupeHttp(dedupe_url, token), taxonomy=taxonomy, cfg=cfg, key_column=key_column,
                          created_column=created_column, status_column=status_column,
                          resolution_column=resolution_column, field=field, test_fraction=test_fraction,
                          dev_fraction=dev_fraction, tune=not no_tune, keep_index=keep_index,
                          progress=lambda s: click.echo(s, err=True))
    except (ValueError, RuntimeError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(render(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


commands = [triage]
