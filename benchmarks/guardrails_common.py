"""Shared harness for the guardrails benchmarks: a throw-away database, the Anthropic emulator, guardrails
under gunicorn, all on free local ports, torn down afterwards."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psycopg
import yaml
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.processes import Proc, free_port, start_service  # noqa: E402
from shared import db  # noqa: E402

ADMIN_URL = os.environ.get("METIS_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TOKENS = {name: f"bench-{name}-{secrets.token_hex(12)}" for name in ("ops", "triage", "n8n", "guardrails")}


@dataclass
class Stack:
    database_url: str
    anthropic_url: str
    anthropic_key: str
    guardrails: Proc
    emulator: subprocess.Popen[bytes]
    workdir: Path

    def sql(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url, autocommit=True)


def write_policy(directory: Path, overrides: dict[str, Any]) -> Path:
    """The repo's policy + prices with `overrides` merged into the policy (shallow per top-level key)."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = yaml.safe_load((ROOT / "config" / "policy.yaml").read_text())
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(policy.get(key), dict):
            policy[key].update(value)
        else:
            policy[key] = value
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy))
    (directory / "prices.yaml").write_text((ROOT / "config" / "prices.yaml").read_text())
    return directory


@contextmanager
def stack(policy_overrides: dict[str, Any], *, workers: int = 2, threads: int = 8,
          extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Fresh DB + emulator + guardrails (gunicorn, `workers` x `threads`); everything removed on exit."""
    name = f"metis_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    db.migrate(url, "guardrails")
    tmp = Path(tempfile.mkdtemp(prefix="metis-bench-"))
    key = "sk-ant-bench-" + secrets.token_hex(16)
    ready = tmp / "ready.json"
    argv = [sys.executable, "-m", "emulators", "--host", "127.0.0.1", "--ready-file", str(ready),
            "--anthropic-key", key]
    for svc in ("anthropic", "jira", "slack", "smtp", "mail", "confluence", "salesforce"):
        argv += [f"--{svc}-port", "0"]
    emu = subprocess.Popen(argv, cwd=ROOT, stdout=open(tmp / "emulator.log", "ab"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    proc = None
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            if emu.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "emulator.log").read_text())
            time.sleep(0.05)
        anthropic_url = json.loads(ready.read_text())["anthropic"]
        cfg = write_policy(tmp / "config", policy_overrides)
        env = {**os.environ, "DATABASE_URL": url, "METIS_CONFIG_DIR": str(cfg), "METIS_ANTHROPIC_URL": anthropic_url,
               "ANTHROPIC_API_KEY": key, "METIS_THREADS": str(threads), "METIS_LOG_LEVEL": "WARNING",
               "METIS_DB_POOL_SIZE": str(threads + 4),
               **{f"METIS_TOKEN_{k.upper()}": v for k, v in TOKENS.items()}, **(extra_env or {})}
        proc = start_service("guardrails", env=env, port=free_port(), log_dir=tmp, workers=workers)
        yield Stack(url, anthropic_url, key, proc, emu, tmp)
    finally:
        if proc:
            proc.stop()
        emu.terminate()
        emu.wait(10)
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def save(name: str, data: dict[str, Any]) -> Path:
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out
