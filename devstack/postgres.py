"""Find a PostgreSQL server for the local stack: DATABASE_URL, else the local server, else a private cluster."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from .processes import free_port, port_in_use

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
HOW_TO_GET_ONE = ("PostgreSQL not found: set DATABASE_URL=postgresql://USER@HOST:PORT/metis, start the local "
                  "server on 127.0.0.1:5432, or install one (apt-get install -y postgresql) so `make up` can "
                  "run a private cluster with initdb/pg_ctl")


class PostgresNotFound(RuntimeError):
    """No server reachable and none could be started; the message says how to get one."""


@dataclass(frozen=True)
class Server:
    """A reachable PostgreSQL server and the URL of a database on it we may create databases from."""

    admin_url: str
    source: str  # "DATABASE_URL", "local" or "private"
    database_url: str  # the metis database

    def url(self, dbname: str) -> str:
        """URL of another database on the same server with the same credentials."""
        return with_db(self.admin_url, dbname)


def reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def ensure_database(admin_url: str, name: str) -> bool:
    """CREATE DATABASE name unless it exists; True if created."""
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return False
        return True


def find(env: Mapping[str, str], run_dir: Path, dbname: str = "metis") -> Server:
    """DATABASE_URL if set, else the local server, else a private cluster under run_dir/pg."""
    url = env.get("DATABASE_URL", "")
    if url:
        parts = urlsplit(url)
        admin = parts._replace(path="/postgres").geturl()
        if reachable(url):
            return Server(admin_url=admin if reachable(admin) else url, source="DATABASE_URL", database_url=url)
        if reachable(admin):
            ensure_database(admin, parts.path.lstrip("/") or dbname)
            return Server(admin_url=admin, source="DATABASE_URL", database_url=url)
        raise PostgresNotFound(f"DATABASE_URL is set but its server does not answer ({parts.hostname}:{parts.port})")
    local = env.get("METIS_LOCAL_PG_URL", LOCAL_URL)
    if reachable(local):
        return Server(admin_url=local, source="local", database_url=with_db(local, dbname))
    admin = start_private(run_dir / "pg")
    return Server(admin_url=admin, source="private", database_url=with_db(admin, dbname))


def with_db(url: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    return urlsplit(url)._replace(path="/" + dbname).geturl()


# ---------------------------------------------------------------- a private cluster


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _as_postgres_user(argv: list[str], pg_dir: Path) -> list[str]:
    """initdb and postgres refuse to run as root; run them as the `postgres` system user then."""
    if os.geteuid() != 0:
        return argv
    try:
        user = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PostgresNotFound(HOW_TO_GET_ONE + " (running as root and no `postgres` system user exists)") from exc
    runuser = shutil.which("runuser")
    if not runuser:
        raise PostgresNotFound(HOW_TO_GET_ONE + " (running as root and `runuser` is missing)")
    for path in (pg_dir, *[p for p in pg_dir.rglob("*")]):
        os.chown(path, user.pw_uid, user.pw_gid)
    return [runuser, "-u", "postgres", "--", *argv]


def private_port_file(pg_dir: Path) -> Path:
    return pg_dir / "PORT"


def start_private(pg_dir: Path, port: int | None = None) -> str:
    """initdb (once) and start a trust-auth cluster on 127.0.0.1 under pg_dir; returns its admin URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise PostgresNotFound(HOW_TO_GET_ONE)
    data = pg_dir / "data"
    pg_dir.mkdir(parents=True, exist_ok=True)
    port_file = private_port_file(pg_dir)
    if port_file.exists():
        port = int(port_file.read_text())
    else:
        port = port or (5433 if not port_in_use(5433) else free_port())
        port_file.write_text(str(port))
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    if reachable(url):
        return url
    if not (data / "PG_VERSION").exists():
        cmd = _as_postgres_user([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                 "--no-instructions"], pg_dir)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise PostgresNotFound(f"initdb failed: {r.stderr.strip()[-500:]}")
    opts = f"-p {port} -k {pg_dir} -c listen_addresses=127.0.0.1"
    cmd = _as_postgres_user([pg_ctl, "-D", str(data), "-l", str(pg_dir / "server.log"), "-o", opts, "-w",
                             "-t", "60", "start"], pg_dir)
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0 or not reachable(url):
        raise PostgresNotFound(f"pg_ctl start failed: {(r.stdout + r.stderr).strip()[-800:]}")
    return url


def stop_private(pg_dir: Path) -> bool:
    """Stop the private cluster if it runs; True if it was stopped."""
    pg_ctl = _pg_bin("pg_ctl")
    data = pg_dir / "data"
    if not pg_ctl or not (data / "postmaster.pid").exists():
        return False
    cmd = _as_postgres_user([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], pg_dir)
    return subprocess.run(cmd, capture_output=True, text=True).returncode == 0
