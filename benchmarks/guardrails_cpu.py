"""Gateway CPU per gated call, old code vs new, robust to a noisy shared machine.

Each variant (the code at `--baseline REF`, and this tree) runs in its own long-lived Python process that builds
the real guardrails WSGI app (create_app: every shared hook — auth, request ids, JSON logs, Prometheus in
multiprocess mode) against its own fresh PostgreSQL database (its own migrations) and the real Anthropic
emulator, and serves gated `POST /anthropic/v1/messages` calls by calling the WSGI app directly — no gunicorn,
no socket on the client side, so the process's CPU time (time.process_time(): every thread, the pool's included)
is the gateway's own work per call: auth, hooks, validation, the reservation + durable flush + settlement
statements (client side), the upstream call (client side), metrics, the response. PostgreSQL's and the
emulator's CPU are in other processes and not counted here (see guardrails_overhead.py for those).

Rounds interleave the variants (ABBA order), so machine noise hits both alike; medians and the ratio are
reported. CPU time still stretches a little under contention (cache misses, frequency), which is why both run
in the same rounds. `--profile` writes a cProfile of the new variant instead.

Run: .venv/bin/python benchmarks/guardrails_cpu.py --baseline 869e567 [--rounds 7] [--calls 1500]
"""
from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "Classify ticket PAY-1042: payslip shows wrong tax."}]}
                  ).encode()


# ------------------------------------------------------------------ the worker (one per variant)


def worker(code_root: str) -> None:
    """Build the app from the environment, then answer `run N` / `profile N PATH` / `quit` on stdin."""
    sys.path.insert(0, code_root)
    os.chdir(code_root)
    from services.guardrails.app import create_app  # noqa: PLC0415 — the variant's own code
    from werkzeug.test import EnvironBuilder

    app = create_app(background=False)
    token = os.environ["METIS_TOKEN_TRIAGE"]

    def call(path: str, body: bytes, headers: dict[str, str]) -> tuple[str, dict[str, str], bytes]:
        env = EnvironBuilder(path=path, method="POST", data=body, headers=headers).get_environ()
        out: dict[str, Any] = {}

        def start_response(status: str, hdrs: list[tuple[str, str]], exc_info: Any = None) -> Any:
            out["status"], out["headers"] = status, dict(hdrs)
            return lambda b: None

        it = app(env, start_response)
        try:
            data = b"".join(it)
        finally:
            if hasattr(it, "close"):
                it.close()
        return out["status"], out["headers"], data

    status, _, data = call("/v1/runs", json.dumps({"task": "bench", "trigger": "manual",
                                                   "external_id": uuid.uuid4().hex}).encode(),
                           {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert status.startswith("201"), (status, data)
    run_id = json.loads(data)["id"]
    # The request as gunicorn would hand it over; only the body stream is fresh per call.
    template = EnvironBuilder(path="/anthropic/v1/messages", method="POST", data=BODY, headers={
        "x-api-key": token, "X-Metis-Run-Id": run_id, "anthropic-version": "2023-06-01",
        "Content-Type": "application/json", "Connection": "keep-alive"}).get_environ()
    template.pop("wsgi.input")
    state: dict[str, Any] = {}

    def start_response(status: str, hdrs: list[tuple[str, str]], exc_info: Any = None) -> Any:
        state["status"], state["headers"] = status, hdrs
        return None

    def gated(n: int) -> int:
        bad = 0
        for _ in range(n):
            env = dict(template)
            env["wsgi.input"] = io.BytesIO(BODY)
            it = app(env, start_response)
            for _chunk in it:
                pass
            if hasattr(it, "close"):
                it.close()
            if not state["status"].startswith("200"):
                bad += 1
        return bad

    gated(100)  # warm-up: connections, caches, first-use cap rows
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        n = int(cmd[1])
        if cmd[0] == "profile":
            import cProfile
            prof = cProfile.Profile(time.thread_time)  # CPU time, not waiting
            prof.enable()
            bad = gated(n)
            prof.disable()
            prof.dump_stats(cmd[2])
            print(json.dumps({"bad": bad}), flush=True)
            continue
        r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        bad = gated(n)
        c1, t1, r1 = time.process_time(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"cpu_ms_per_call": (c1 - c0) * 1000 / n, "wall_ms_per_call": (t1 - t0) * 1000 / n,
                          "user_ms_per_call": (r1.ru_utime - r0.ru_utime) * 1000 / n,
                          "sys_ms_per_call": (r1.ru_stime - r0.ru_stime) * 1000 / n,
                          "ctx_switches_per_call": (r1.ru_nvcsw + r1.ru_nivcsw - r0.ru_nvcsw - r0.ru_nivcsw) / n,
                          "bad": bad, "last_headers": dict(state["headers"])}), flush=True)


# ------------------------------------------------------------------ the orchestrator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", help="git ref of the old code, run side by side (e.g. 869e567)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=1500, help="gated calls per variant per round")
    ap.add_argument("--profile", help="write a cProfile of the new variant's calls to this path and stop")
    ap.add_argument("--name", default="guardrails_cpu")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from guardrails_common import (ADMIN_URL, TOKENS, baseline_tree, save, start_emulator,  # noqa: PLC0415
                                   write_policy)
    from guardrails_overhead import POLICY  # noqa: PLC0415

    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    sys.path.insert(0, str(ROOT))
    from shared import db  # noqa: PLC0415

    trees: dict[str, Path] = {"new": ROOT}
    if args.baseline and not args.profile:
        trees = {"old": baseline_tree(args.baseline), "new": ROOT}
        atexit.register(shutil.rmtree, trees["old"], True)
    tmp = Path(tempfile.mkdtemp(prefix="metis-cpu-"))
    atexit.register(shutil.rmtree, tmp, True)
    key = "sk-ant-bench-" + uuid.uuid4().hex
    emu, anthropic_url = start_emulator(tmp, key)
    dbs: list[str] = []
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        cfg = write_policy(tmp / "config", POLICY)
        for v, root in trees.items():
            name = f"metis_cpu_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            dbs.append(name)
            url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
            db.migrate(url, "guardrails", directory=root / "services" / "guardrails" / "migrations")
            prom = tmp / f"prom-{v}"
            prom.mkdir()
            env = {**os.environ, "DATABASE_URL": url, "METIS_CONFIG_DIR": str(cfg),
                   "METIS_ANTHROPIC_URL": anthropic_url, "ANTHROPIC_API_KEY": key, "METIS_LOG_LEVEL": "WARNING",
                   "PROMETHEUS_MULTIPROC_DIR": str(prom), "METIS_GUARDRAILS_BACKGROUND": "0",
                   "PYTHONPATH": str(root), **{f"METIS_TOKEN_{k.upper()}": t for k, t in TOKENS.items()}}
            procs[v] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(root)],
                                        cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for v, p in procs.items():
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"{v} worker failed to start")

        def ask(v: str, cmd: str) -> dict[str, Any]:
            p = procs[v]
            p.stdin.write(cmd + "\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
            return json.loads(p.stdout.readline())  # type: ignore[union-attr]

        if args.profile:
            print(ask("new", f"profile {args.calls} {args.profile}"))
            return
        load_start = os.getloadavg()
        rounds: list[dict[str, Any]] = []
        for i in range(args.rounds):
            order = list(trees) if i % 2 == 0 else list(reversed(trees))
            row: dict[str, Any] = {"load_avg_1m": os.getloadavg()[0]}
            for v in order:
                row[v] = ask(v, f"run {args.calls}")
                assert row[v]["bad"] == 0, row[v]
            rounds.append(row)
            print(f"round {i + 1} (load {row['load_avg_1m']:.1f}): " + "  ".join(
                f"{v} {row[v]['cpu_ms_per_call']:.3f} ms CPU/call" for v in trees), flush=True)
        summary: dict[str, Any] = {
            "calls_per_round": args.calls, "rounds": args.rounds, "baseline": args.baseline,
            "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
            "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
            "note": "CPU of the gateway process only (every thread), per gated call through the real WSGI app; "
                    "PostgreSQL and emulator CPU excluded; medians over interleaved rounds"}
        for v in trees:
            summary[v] = {k: round(statistics.median(r[v][k] for r in rounds), 3)
                          for k in ("cpu_ms_per_call", "user_ms_per_call", "sys_ms_per_call", "wall_ms_per_call",
                                    "ctx_switches_per_call")}
            summary[v]["cpu_ms_per_call_min_max"] = [round(min(r[v]["cpu_ms_per_call"] for r in rounds), 3),
                                                     round(max(r[v]["cpu_ms_per_call"] for r in rounds), 3)]
        if "old" in trees:
            ratios = [r["new"]["cpu_ms_per_call"] / r["old"]["cpu_ms_per_call"] for r in rounds]
            summary["ratio_new_over_old_median"] = round(statistics.median(ratios), 3)
            summary["ratio_new_over_old_per_round"] = [round(x, 3) for x in ratios]
        summary["sample_response_headers"] = {v: rounds[-1][v]["last_headers"] for v in trees}
        for r in rounds:
            for v in trees:
                r[v].pop("last_headers", None)
        summary["raw"] = rounds
        print(json.dumps({k: v for k, v in summary.items() if k not in ("raw", "sample_response_headers")},
                         indent=2))
        print("saved", save(args.name, summary))
    finally:
        for p in procs.values():
            try:
                p.stdin.write("quit\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
                p.wait(10)
            except Exception:  # noqa: BLE001 — tear-down is best effort
                p.kill()
        emu.terminate()
        emu.wait(10)
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            for name in dbs:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
