"""`make up` / `make down` / `python -m devstack status`: the whole local stack on the fixed ports.

up: PostgreSQL (found or started), the `metis` database migrated, tokens in .run/tokens.env, the
emulators with demo data, every service under gunicorn, n8n with every workflow published; prints
every URL. Processes run in their own sessions and are tracked by pidfiles in .run/pids, so `down`
stops exactly what `up` started, and nothing else.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import psycopg
import requests
from psycopg import sql

from shared.settings import SERVICE_PORTS, Secret

from . import demo, n8n, postgres, tokens
from .processes import ROOT, VENV_BIN, Proc, port_in_use, spawn, start_services
from .stack import (ANTHROPIC_API_URL, SERVICES, externals_from_emulators, n8n_webhook_env, service_env,
                    service_urls, workflow_env)

RUN = Path(os.environ.get("METIS_RUN_DIR", str(ROOT / ".run")))
PIDS = RUN / "pids"
LOGS = RUN / "logs"
STATE = RUN / "state.json"
TOKENS = RUN / "tokens.env"
EMULATOR_PORTS = {"anthropic": 8200, "jira": 8201, "slack": 8202, "mail": 8203, "confluence": 8204,
                  "salesforce": 8205, "smtp": 8025}
N8N_PORT, N8N_BROKER_PORT = 5678, 5679
DB_NAME, N8N_DB_NAME = "metis", "metis_n8n"


class UpError(RuntimeError):
    """`make up` cannot continue; the message says why and what to do."""


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise UpError(f"{name} must be a port number, got {value!r}") from exc


@dataclass(frozen=True)
class Ports:
    services: dict[str, int]
    emulators: dict[str, int]
    n8n: int
    n8n_broker: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Ports":
        return cls(services={s: _port(env, f"METIS_{s.upper()}_PORT", p) for s, p in SERVICE_PORTS.items()},
                   emulators={e: _port(env, f"METIS_EMU_{e.upper()}_PORT", p) for e, p in EMULATOR_PORTS.items()},
                   n8n=_port(env, "METIS_N8N_PORT", N8N_PORT),
                   n8n_broker=_port(env, "METIS_N8N_BROKER_PORT", N8N_BROKER_PORT))

    def all(self) -> dict[str, int]:
        named = {**self.services, **{f"{k} emulator": v for k, v in self.emulators.items()}}
        named.update({"n8n": self.n8n, "n8n task broker": self.n8n_broker})
        return named


# ---------------------------------------------------------------- pidfiles


def _start_ticks(pid: int) -> int | None:
    """Process start time (clock ticks since boot): tells our process from a later one with the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def write_pidfile(proc: Proc) -> None:
    PIDS.mkdir(parents=True, exist_ok=True)
    pid = proc.popen.pid
    (PIDS / f"{proc.name}.json").write_text(json.dumps({
        "name": proc.name, "pid": pid, "start_ticks": _start_ticks(pid), "url": proc.url, "log": str(proc.log_path)}))


def tracked() -> list[dict[str, Any]]:
    """Pidfiles of processes `up` started, each with `alive` (same pid and start time, still running)."""
    found = []
    for path in sorted(PIDS.glob("*.json")) if PIDS.exists() else []:
        info = json.loads(path.read_text())
        info["pidfile"] = str(path)
        info["alive"] = _start_ticks(info["pid"]) == info["start_ticks"] and bool(_group_members(info["pid"]))
        found.append(info)
    return found


def stop_groups(pgids: list[int], timeout: float = 15.0) -> list[int]:
    """SIGTERM process groups together (gunicorn and n8n stop their children), SIGKILL what is left;
    returns the groups that survived."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_group_members(p) for p in pgids):
            time.sleep(0.1)
        pgids = [p for p in pgids if _group_members(p)]
        if not pgids:
            break
    return pgids


# ---------------------------------------------------------------- up


def _wait_ready_file(proc: Proc, path: Path, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise UpError(f"emulators exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.05)
    raise UpError(f"emulators not ready after {timeout}s:\n{proc.log_tail()}")


def start_emulators(secrets_: Mapping[str, str], ports: Ports, base: Mapping[str, str]) -> tuple[Proc, dict[str, Any]]:
    """`python -m emulators` on the fixed ports with demo data; credentials passed in the environment, not argv."""
    ready = RUN / "emulators.json"
    ready.unlink(missing_ok=True)
    argv = [str(VENV_BIN / "python"), "-m", "emulators", "--host", "127.0.0.1", "--ready-file", str(ready)]
    if base.get("METIS_DEMO", "1") != "0":
        argv.append("--seed-demo")
    for name, port in ports.emulators.items():
        argv += [f"--{name}-port", str(port)]
    env = {k: v for k, v in base.items() if not k.startswith(("METIS_", "ANTHROPIC_", "EMULATOR_"))}
    env.update({"EMULATOR_ANTHROPIC_KEY": secrets_["METIS_EMU_ANTHROPIC_KEY"],
                "EMULATOR_JIRA_USER": secrets_["METIS_JIRA_EMAIL"],
                "EMULATOR_JIRA_TOKEN": secrets_["METIS_JIRA_API_TOKEN"],
                "EMULATOR_JIRA_WEBHOOK_SECRET": secrets_["METIS_JIRA_WEBHOOK_SECRET"],
                "EMULATOR_SALESFORCE_CLIENT_ID": secrets_["METIS_SALESFORCE_CLIENT_ID"],
                "EMULATOR_SALESFORCE_CLIENT_SECRET": secrets_["METIS_SALESFORCE_CLIENT_SECRET"],
                "PYTHONUNBUFFERED": "1"})
    proc = spawn("emulators", argv, env=env, url=f"http://127.0.0.1:{ports.emulators['anthropic']}", log_dir=LOGS)
    write_pidfile(proc)
    return proc, _wait_ready_file(proc, ready)


def _check_ports_free(ports: Ports) -> None:
    busy = [f"{name} ({port})" for name, port in ports.all().items() if port_in_use(port)]
    if busy:
        raise UpError("ports already in use: " + ", ".join(busy) + ". Stop whatever holds them "
                      "(`make down` if it is an earlier Metis), or move Metis with METIS_<NAME>_PORT.")


def _migrate(database_url: str, base: Mapping[str, str]) -> None:
    env = {**tokens_free(base), "DATABASE_URL": database_url}
    r = subprocess.run([str(VENV_BIN / "metis"), "migrate"], env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise UpError(f"metis migrate failed:\n{r.stdout}{r.stderr}")


def _n8n_database_for_key(server: postgres.Server, key: str) -> None:
    """n8n's database and user folder are bound to its encryption key (credentials and n8n's data keys
    are encrypted with it). The database carries a fingerprint of the key; if .run/tokens.env was
    regenerated, or another clone used this server, n8n starts afresh: workflows come back from
    n8n/workflows/ and credentials from the tokens, only execution history is lost."""
    mark = "metis n8n, key " + hashlib.sha256(f"metis-n8n:{key}".encode()).hexdigest()[:16]
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                           (N8N_DB_NAME,)).fetchone()
        if row is not None and row[0] != mark:
            print(f"n8n's database {N8N_DB_NAME} belongs to another encryption key (new .run/tokens.env or another "
                  "clone): recreating it; workflows and credentials are imported again, execution history is dropped.",
                  flush=True)
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(N8N_DB_NAME)))
            row = None
        if row is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(N8N_DB_NAME)))
            conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(N8N_DB_NAME), sql.Literal(mark)))
    settings = RUN / "n8n" / ".n8n" / "config"
    try:
        stale = json.loads(settings.read_text()).get("encryptionKey") != key
    except (OSError, ValueError):
        stale = settings.exists()
    if stale:
        shutil.rmtree(RUN / "n8n")


def tokens_free(base: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in base.items() if not k.startswith(("METIS_TOKEN_", "ANTHROPIC_"))}


def up(env: Mapping[str, str] | None = None) -> int:
    """Bring the whole stack up (or report that it already runs)."""
    env = dict(os.environ if env is None else env)
    t0 = time.monotonic()
    procs = tracked()
    if procs and all(p["alive"] for p in procs) and STATE.exists():
        print("Metis is already running (make down to stop it).\n")
        print_summary(json.loads(STATE.read_text()))
        return 0
    if procs:
        print("Some Metis processes from an earlier `make up` are gone; stopping the rest and starting again.")
        down(quiet=True)
    RUN.mkdir(parents=True, exist_ok=True)
    # Traversable but not listable: a private PostgreSQL cluster runs as the `postgres` user when we
    # are root; secrets inside are 0600 files in 0700 folders.
    os.chmod(RUN, 0o711)
    LOGS.mkdir(exist_ok=True)
    secrets_ = tokens.load_or_create(TOKENS)
    ports = Ports.from_env(env)
    _check_ports_free(ports)

    step("PostgreSQL")
    server = postgres.find(env, RUN, DB_NAME)
    if server.source == "private":
        (RUN / "pg" / "STARTED_BY_UP").write_text("1")
    postgres.ensure_database(server.admin_url, urlsplit(server.database_url).path.lstrip("/"))
    _n8n_database_for_key(server, secrets_["N8N_ENCRYPTION_KEY"])
    _migrate(server.database_url, env)

    started: list[Proc] = []
    try:
        step("emulators")
        emu_proc, emu_urls = start_emulators(secrets_, ports, env)
        started.append(emu_proc)
        slack = emu_urls.get("slack", "")
        externals = externals_from_emulators(
            emu_urls,
            {"anthropic_key": secrets_["METIS_EMU_ANTHROPIC_KEY"], "jira_user": secrets_["METIS_JIRA_EMAIL"],
             "jira_token": secrets_["METIS_JIRA_API_TOKEN"], "jira_webhook_secret": secrets_["METIS_JIRA_WEBHOOK_SECRET"],
             "salesforce_client_id": secrets_["METIS_SALESFORCE_CLIENT_ID"],
             "salesforce_client_secret": secrets_["METIS_SALESFORCE_CLIENT_SECRET"]},
            slack_webhook_url=f"{slack}/services/{secrets_['METIS_SLACK_WEBHOOK_PATH']}" if slack else "",
            real_anthropic_key=env.get("ANTHROPIC_API_KEY") or None,
            real_anthropic_url=env.get("METIS_ANTHROPIC_URL", ANTHROPIC_API_URL))

        step("services")
        caller_tokens = {k[len("METIS_TOKEN_"):].lower(): Secret(v) for k, v in secrets_.items()
                         if k.startswith("METIS_TOKEN_")}
        urls = service_urls(ports.services)
        files = n8n.workflow_files()
        n8n_url = f"http://127.0.0.1:{ports.n8n}"
        envs = {s: {**service_env(s, base=env, database_url=server.database_url, tokens=caller_tokens, urls=urls,
                                  externals=externals, config_dir=str(ROOT / "config")),
                    **n8n_webhook_env(s, n8n_url, n8n.webhook_paths(files))} for s in SERVICES}
        svc = start_services(envs, ports.services, log_dir=LOGS, workers=int(env.get("METIS_WORKERS", "2")))
        for proc in svc.values():
            started.append(proc)
            write_pidfile(proc)

        step(f"n8n import + publish ({len(files)} workflows)")
        inst = n8n.install()
        cfg = n8n.N8nConfig(
            database_url=server.url(N8N_DB_NAME), port=ports.n8n, broker_port=ports.n8n_broker,
            user_folder=RUN / "n8n", log_dir=LOGS, encryption_key=Secret(secrets_["N8N_ENCRYPTION_KEY"]),
            n8n_token=caller_tokens["n8n"], workflow_env=workflow_env(urls, externals, env),
            owner_email=secrets_["N8N_OWNER_EMAIL"], owner_password=Secret(secrets_["N8N_OWNER_PASSWORD"]),
            smtp={"host": externals.public.get("METIS_SMTP_HOST", ""),
                  "port": externals.public.get("METIS_SMTP_PORT", "0")} if "METIS_SMTP_HOST" in externals.public else None)
        n8n_env, imported = n8n.prepare_once(inst, cfg, files)
        if not imported:
            print("    workflows and credentials unchanged since the last import: skipped", flush=True)
        step("n8n start (until production webhooks answer)")
        n8n_proc = n8n.start(inst, n8n_env, cfg, name="n8n", webhooks=n8n.webhook_paths(files))
        started.append(n8n_proc)
        write_pidfile(n8n_proc)

        loaded = ["none (METIS_DEMO=0)"]
        if env.get("METIS_DEMO", "1") != "0":
            step("demo data")
            loaded = demo.load(urls=urls, externals=externals, ops_token=caller_tokens["ops"])
            loaded.append(demo.wire_jira_webhooks(emu_urls["jira"], cfg.url))
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        for path in PIDS.glob("*.json"):
            path.unlink()
        raise

    step("")
    state = {
        "services": {s: urls[f"METIS_{s.upper()}_URL"] for s in SERVICES},
        "n8n": cfg.url, "owner_email": cfg.owner_email, "workflows": [f.path.stem for f in files],
        "emulators": {k: v for k, v in emu_urls.items() if k != "pid"},
        "database": _redact(server.database_url), "database_source": server.source,
        "offline": externals.offline, "anthropic_url": externals.public["METIS_ANTHROPIC_URL"],
        "tokens": str(TOKENS), "logs": str(LOGS), "demo": loaded,
        "seconds": round(time.monotonic() - t0, 1), "step_seconds": dict(STEP_TIMES),
    }
    STATE.write_text(json.dumps(state, indent=2))
    print()
    print_summary(state)
    return 0


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
    return url


_CURRENT: list[tuple[str, float]] = []  # the stage `up` is in and when it began
STEP_TIMES: dict[str, float] = {}


def step(what: str) -> None:
    """Announce a stage of `up` and note how long the previous one took."""
    now = time.monotonic()
    if _CURRENT:
        name, began = _CURRENT.pop()
        STEP_TIMES[name] = round(now - began, 1)
    if what:
        _CURRENT.append((what, now))
    if what:
        print(f"==> {what}", flush=True)


def print_summary(state: Mapping[str, Any]) -> None:
    """Every URL and where the tokens are; never a secret."""
    mode = ("offline: LLM calls go to the local Anthropic emulator" if state["offline"]
            else f"online: LLM calls go to {state['anthropic_url']} with ANTHROPIC_API_KEY")
    lines = [f"Metis is up ({mode}).", ""]
    lines.append(f"  n8n editor      {state['n8n']}/   login {state['owner_email']} "
                 f"(password: N8N_OWNER_PASSWORD in {state['tokens']})")
    lines.append(f"  n8n metrics     {state['n8n']}/metrics")
    lines.append(f"  workflows       {len(state['workflows'])} published from n8n/workflows/: "
                 f"{', '.join(state['workflows'])}")
    for name, url in state["services"].items():
        lines.append(f"  {name:<15} {url}   ({url}/metrics, {url}/openapi.json, {url}/readyz)")
    emus = state["emulators"]
    for name in ("anthropic", "jira", "slack", "mail", "confluence", "salesforce"):
        if name in emus:
            lines.append(f"  {name + ' emu':<15} {emus[name]}")
    if "smtp" in emus:
        lines.append(f"  {'smtp emu':<15} {emus['smtp']['host']}:{emus['smtp']['port']}")
    lines += ["", f"  database        {state['database']} ({state['database_source']})",
              f"  tokens          {state['tokens']} (mode 0600): METIS_TOKEN_<CALLER> per caller; use "
              f"METIS_TOKEN_OPS to call a service, e.g.",
              f"                  curl -H \"Authorization: Bearer $METIS_TOKEN_OPS\" "
              f"{state['services']['guardrails']}/v1/whoami",
              f"  logs            {state['logs']}/",
              f"  demo data       {'; '.join(state['demo'])}",
              "", "Stop everything with `make down`."]
    if state.get("step_seconds"):
        took = ", ".join(f"{k.split(' (')[0]} {v}s" for k, v in state["step_seconds"].items())
        lines.insert(-2, f"  started in      {state['seconds']}s ({took})")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- down / status


def down(quiet: bool = False) -> int:
    """Stop every process `up` started (by pidfile), then the private PostgreSQL cluster if `up` started it."""
    live = [info for info in tracked() if info["alive"]]
    survivors = set(stop_groups([info["pid"] for info in live]))
    stopped = [info["name"] for info in live if info["pid"] not in survivors]
    leftovers = [info["name"] for info in live if info["pid"] in survivors]
    for info in tracked():
        if info["pid"] not in survivors:
            Path(info["pidfile"]).unlink(missing_ok=True)
    STATE.unlink(missing_ok=True)
    pg_marker = RUN / "pg" / "STARTED_BY_UP"
    if pg_marker.exists():
        if postgres.stop_private(RUN / "pg"):
            stopped.append("private PostgreSQL")
        pg_marker.unlink()
    if leftovers:
        print(f"still running: {', '.join(leftovers)}", file=sys.stderr)
        return 1
    if not quiet:
        print(f"Stopped: {', '.join(stopped)}." if stopped else "Nothing was running.")
    return 0


def status() -> int:
    """Which tracked processes run, and whether each answers."""
    procs = tracked()
    if not procs:
        print("Metis is not running (make up).")
        return 1
    bad = False
    for info in procs:
        state = "running" if info["alive"] else "DEAD"
        if info["alive"] and info["name"] != "emulators":
            try:
                code = requests.get(info["url"] + "/healthz", timeout=3).status_code
                state += f", /healthz {code}"
                bad |= code != 200
            except requests.RequestException as exc:
                state += f", /healthz {type(exc).__name__}"
                bad = True
        bad |= not info["alive"]
        print(f"{info['name']:<12} pid {info['pid']:<8} {info['url']:<28} {state}")
    return 1 if bad else 0
