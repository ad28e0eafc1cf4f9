"""Start, wait for and stop local processes (gunicorn services, emulators, n8n)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import requests

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now (for tests; `make up` uses the fixed ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left."""
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: Sequence[str], *, env: Mapping[str, str], url: str, log_dir: Path,
          cwd: Path = ROOT) -> Proc:
    """Start argv in its own process group, output to log_dir/name.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")
    popen = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return Proc(name, popen, url, log_path)


def wait_http(proc: Proc, path: str = "/healthz", *, timeout: float = 60.0, expect: int = 200) -> None:
    """Wait until GET url+path answers `expect`; fail with the log tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            r = requests.get(proc.url + path, timeout=2)
            if r.status_code == expect:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not ready at {proc.url}{path} after {timeout}s ({last}):\n{proc.log_tail()}")


def start_service(service: str, *, env: Mapping[str, str], port: int, log_dir: Path, workers: int = 2,
                  timeout: float = 60.0) -> Proc:
    """Run a Metis service under gunicorn (multiprocess metrics on) and wait for /healthz."""
    run_env = dict(env)
    run_env.update({"METIS_BIND": f"127.0.0.1:{port}", "METIS_WORKERS": str(workers),
                    "PROMETHEUS_MULTIPROC_DIR": str(log_dir / f"prom-{service}-{port}"),
                    "PYTHONUNBUFFERED": "1"})
    argv = [str(VENV_BIN / "gunicorn"), "-c", str(ROOT / "shared" / "gunicorn_conf.py"),
            f"services.{service}.app:create_app()"]
    proc = spawn(f"{service}-{port}", argv, env=run_env, url=f"http://127.0.0.1:{port}", log_dir=log_dir)
    wait_http(proc, "/healthz", timeout=timeout)
    return proc
