"""Shared harness for the guardrails benchmarks: a throw-away database, the Anthropic emulator, guardrails
under gunicorn, all on free local ports, torn down afterwards."""
from __future__ import annotations

import json
import os
import secrets
import shutil
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

from devstack.processes import VENV_BIN, Proc, free_port, spawn, wait_http  # noqa: E402
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


def baseline_tree(ref: str) -> Path:
    """The repository at `ref` (e.g. the commit before an optimisation) unpacked into a temporary folder, to run
    old and new code side by side in one benchmark run (same venv; the unpacked tree comes first on sys.path)."""
    out = Path(tempfile.mkdtemp(prefix="metis-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def start_emulator(tmp: Path, key: str) -> tuple[subprocess.Popen[bytes], str]:
    """The emulators as one process on free ports (log in tmp/emulator.log); returns it and the Anthropic URL.
    If it does not come up within 20 s it is stopped and its log raised."""
    ready = tmp / "ready.json"
    argv = [sys.executable, "-m", "emulators", "--host", "127.0.0.1", "--ready-file", str(ready),
            "--anthropic-key", key]
    for svc in ("anthropic", "jira", "slack", "smtp", "mail", "confluence", "salesforce"):
        argv += [f"--{svc}-port", "0"]
    emu = subprocess.Popen(argv, cwd=ROOT, stdout=open(tmp / "emulator.log", "ab"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if emu.poll() is not None or time.monotonic() > deadline:
            emu.terminate()
            emu.wait(10)
            raise RuntimeError((tmp / "emulator.log").read_text())
        time.sleep(0.05)
    return emu, json.loads(ready.read_text())["anthropic"]


@contextmanager
def stack(policy_overrides: dict[str, Any], *, workers: int = 2, threads: int = 8,
          extra_env: dict[str, str] | None = None, code_root: Path = ROOT) -> Iterator[Stack]:
    """Fresh DB + emulator + guardrails (gunicorn, `workers` x `threads`, the code and migrations of
    `code_root`); everything removed on exit."""
    name = f"metis_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    db.migrate(url, "guardrails", directory=code_root / "services" / "guardrails" / "migrations")
    tmp = Path(tempfile.mkdtemp(prefix="metis-bench-"))
    failed = True
    key = "sk-ant-bench-" + secrets.token_hex(16)
    emu, anthropic_url = start_emulator(tmp, key)
    proc = None
    try:
        cfg = write_policy(tmp / "config", policy_overrides)
        env = {**os.environ, "DATABASE_URL": url, "METIS_CONFIG_DIR": str(cfg), "METIS_ANTHROPIC_URL": anthropic_url,
               "ANTHROPIC_API_KEY": key, "METIS_THREADS": str(threads), "METIS_LOG_LEVEL": "WARNING",
               "METIS_DB_POOL_SIZE": str(threads + 4),
               **{f"METIS_TOKEN_{k.upper()}": v for k, v in TOKENS.items()}, **(extra_env or {})}
        port = free_port()
        env.update({"METIS_BIND": f"127.0.0.1:{port}", "METIS_WORKERS": str(workers), "PYTHONUNBUFFERED": "1",
                    "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom")})
        proc = spawn("guardrails", [str(VENV_BIN / "gunicorn"), "-c", str(code_root / "shared" / "gunicorn_conf.py"),
                                    "services.guardrails.app:create_app()"],
                     env=env, url=f"http://127.0.0.1:{port}", log_dir=tmp, cwd=code_root)
        wait_http(proc, "/healthz", timeout=60)
        yield Stack(url, anthropic_url, key, proc, emu, tmp)
        failed = False
    finally:
        if proc:
            proc.stop()
        emu.terminate()
        emu.wait(10)
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if not failed:  # the logs stay only when something went wrong
            shutil.rmtree(tmp, ignore_errors=True)


_TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _ticks_cpu(pid: int) -> float:
    """utime + stime of a process, dead threads included (10 ms resolution)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _sched_cpu(pid: int) -> float:
    """CPU time of a process's live threads, nanosecond resolution (for processes whose threads persist)."""
    total = 0
    for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(f.read_text().split()[0])
        except OSError:
            continue
    return total / 1e9


def _machine_busy() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICK


class CpuMeter:
    """CPU seconds by part: the load generator (this process), the emulator, the gateway (gunicorn master +
    workers) and the PostgreSQL backends serving the benchmark database; plus everything else on the machine
    (other users' load). Much steadier than latency on a shared machine, though contention for the cores still
    inflates it (by tens of per cent at load average 10+): compare old and new in the same run.

    `calibrate` measures what the idle stack burns anyway (the gateway's background jobs, the emulator's poll
    loop) so that per-call figures count only the calls' own work."""

    PARTS = ("loadgen", "emulator", "gateway", "postgres")

    def __init__(self, st: Stack) -> None:
        self._st = st
        self._conn = psycopg.connect(st.database_url, autocommit=True)
        self.idle_per_s = {k: 0.0 for k in self.PARTS}

    def snapshot(self) -> dict[str, float]:
        backends = [r[0] for r in self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]
        return {"loadgen": time.process_time(), "emulator": _ticks_cpu(self._st.emulator.pid),
                "gateway": sum(_sched_cpu(p) for p in _tree(self._st.guardrails.popen.pid)),
                "postgres": sum(_sched_cpu(p) for p in backends), "machine": _machine_busy(),
                "wall": time.monotonic()}

    def calibrate(self, seconds: float = 3.0) -> dict[str, float]:
        a = self.snapshot()
        time.sleep(seconds)
        b = self.snapshot()
        wall = b["wall"] - a["wall"]
        self.idle_per_s = {k: max(0.0, (b[k] - a[k]) / wall) for k in self.PARTS if k != "loadgen"} | {"loadgen": 0.0}
        return {k: round(v * 1000, 2) for k, v in self.idle_per_s.items()}  # ms of CPU per second

    def per_call_ms(self, before: dict[str, float], after: dict[str, float], calls: int) -> dict[str, float]:
        wall = after["wall"] - before["wall"]
        d = {k: after[k] - before[k] for k in before}
        out = {k: round(max(0.0, d[k] - self.idle_per_s[k] * wall) * 1000 / calls, 3) for k in self.PARTS}
        ours = sum(d[k] for k in self.PARTS)
        out["other_machine"] = round(max(0.0, d["machine"] - ours) * 1000 / calls, 3)
        return out

    def close(self) -> None:
        self._conn.close()


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
