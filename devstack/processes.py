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
from typing import Iterable, Mapping, Sequence

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
        try:  # children that outlived their leader (a runner, a stuck worker) go too
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        """SIGTERM the process group without waiting (see stop_all)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

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
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not ready at {proc.url}{path} after {timeout}s ({last}):\n{proc.log_tail()}")


def spawn_service(service: str, *, env: Mapping[str, str], port: int, log_dir: Path, workers: int = 2,
                  host: str = "127.0.0.1", name: str | None = None) -> Proc:
    """Start a Metis service under gunicorn (multiprocess metrics on) without waiting for it."""
    run_env = dict(env)
    run_env.update({"METIS_BIND": f"{host}:{port}", "METIS_WORKERS": str(workers),
                    "PROMETHEUS_MULTIPROC_DIR": str(log_dir / f"prom-{service}-{port}"),
                    "PYTHONUNBUFFERED": "1"})
    argv = [str(VENV_BIN / "gunicorn"), "-c", str(ROOT / "shared" / "gunicorn_conf.py"),
            f"services.{service}.app:create_app()"]
    return spawn(name or f"{service}-{port}", argv, env=run_env, url=f"http://127.0.0.1:{port}", log_dir=log_dir)


def start_service(service: str, *, env: Mapping[str, str], port: int, log_dir: Path, workers: int = 2,
                  timeout: float = 60.0) -> Proc:
    """Run a Metis service under gunicorn (multiprocess metrics on) and wait for /healthz."""
    proc = spawn_service(service, env=env, port=port, log_dir=log_dir, workers=workers)
    try:
        wait_http(proc, "/healthz", timeout=timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_services(envs: Mapping[str, Mapping[str, str]], ports: Mapping[str, int], *, log_dir: Path,
                   workers: int = 2, timeout: float = 120.0, ready_path: str = "/readyz") -> dict[str, Proc]:
    """Start several services at once (they boot in parallel) and wait until each is ready (by default
    /readyz: its dependencies answer, models are loaded); stop all if one fails."""
    procs: dict[str, Proc] = {}
    try:
        for service, env in envs.items():
            procs[service] = spawn_service(service, env=env, port=ports[service], log_dir=log_dir,
                                           workers=workers, name=service)
        for proc in procs.values():
            wait_http(proc, ready_path, timeout=timeout)
    except BaseException:
        stop_all(procs.values())
        raise
    return procs


def stop_all(procs: Iterable[Proc], timeout: float = 10.0) -> None:
    """Stop several processes at once: SIGTERM every group first, then wait for (or kill) each."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.stop(timeout)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts connections on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
