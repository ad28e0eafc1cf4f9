"""Run `metis triage evaluate` on gitbugs-hadoop's Priority column against a freshly started dedupe.

Starts dedupe under gunicorn on a free port with a scratch database (dropped afterwards), then runs the
evaluation command exactly as an operator would, through dedupe's HTTP API.

    .venv/bin/python benchmarks/triage_evaluate.py [--json-out benchmarks/triage_results/evaluate-gitbugs-priority.json]
"""
from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.processes import VENV_BIN, free_port, start_service, wait_http  # noqa: E402
from shared import db  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop" / "issues.csv"
ADMIN_URL = os.environ.get("METIS_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    name = "metis_triage_eval_" + uuid.uuid4().hex[:8]
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    token = "eval-" + secrets.token_hex(12)
    proc = None
    try:
        db.migrate(url, "dedupe")
        env = {**os.environ, "DATABASE_URL": url, "METIS_TOKEN_TRIAGE": token,
               "METIS_CONFIG_DIR": str(ROOT / "config")}
        with tempfile.TemporaryDirectory(prefix="triage-eval-") as logs:
            proc = start_service("dedupe", env=env, port=free_port(), log_dir=Path(logs), workers=1, timeout=180)
            wait_http(proc, "/readyz", timeout=300)
            argv = [str(VENV_BIN / "metis"), "triage", "evaluate", "--csv", str(DATA),
                    "--text-columns", "Summary,Description", "--label-column", "Priority",
                    "--key-column", "Issue id", "--created-column", "Created", "--status-column", "Status",
                    "--resolution-column", "Resolution"]
            if args.json_out:
                argv += ["--json-out", str(args.json_out)]
            rc = subprocess.run(argv, env={**env, "METIS_DEDUPE_URL": proc.url}, cwd=ROOT).returncode
            proc.stop()
            proc = None
    finally:
        if proc is not None:
            proc.stop()
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    sys.exit(rc)


if __name__ == "__main__":
    main()
