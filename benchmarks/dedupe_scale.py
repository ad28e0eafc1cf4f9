"""Dedupe speed over HTTP, before and after, side by side: indexing tickets/s, query p50/p95 at 100,000 tickets,
start-up time and memory per worker. Both versions run under gunicorn with 2 workers, as deployed.

"Before" is another commit of this repository (--baseline, default the last one before the ONNX work),
unpacked with `git archive` into a temporary directory and served from there with the same venv.

1. Indexing: each version gets a fresh database and indexes the 2,503 real gitbugs-hadoop reports through
   `POST /v1/tickets` in batches of 64, `--in-flight` batches at once (a back-fill or several n8n
   executions); rounds alternate between the versions so the shared machine's noise hits both alike.
2. Queries at 100,000 tickets: a template database is built once (kept as `metis_dedupe_bench_100k_v1`,
   reused by later runs) and cloned per version. Its tickets recombine real gitbugs-hadoop texts (the
   summary of one report, description sentences of two others, a random component and version), so the
   lexical index has realistic vocabulary and posting lengths; their vectors are the real vector of the
   report the summary came from plus Gaussian noise (embedding 100k texts here would take most of an
   hour and latency does not depend on the values); the 2,503 real reports carry their real vectors.
   Both services then answer the same queries alternately (the 66 real duplicate queries plus 134
   other real reports, `created_before` = the query's creation time, as the evaluation does).
3. Memory: RSS of each worker after the queries; start-up: process start to /readyz with 100k tickets.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python benchmarks/dedupe_scale.py
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.processes import Proc, free_port, spawn, wait_http  # noqa: E402
from services.dedupe.config import load_config  # noqa: E402
from services.dedupe.evaluation import Dataset, load_dataset  # noqa: E402
from services.dedupe.service import LEXICAL_CHARS  # noqa: E402
from services.dedupe.text import clean, for_embedding, tokens  # noqa: E402
from shared import db  # noqa: E402
from shared.embeddings import content_hash, make_embedder  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gitbugs-hadoop"
TEMPLATE = "metis_dedupe_bench_100k_v1"
BASELINE = "2021771"  # dedupe as of the previous session: torch int8, full float32 scan, 2 BLAS threads


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().split(") ")[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of some processes so far (what they would need of idle cores)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def unpack(rev: str, dest: Path) -> Path:
    """The repository at `rev`, as files (no git metadata), beside a link to ../shared for the data."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    tree = dest / "repo"
    tree.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tree, filter="data")
    (dest / "shared").symlink_to(ROOT.parent / "shared")
    return tree


def start(tree: Path, name: str, url: str, token: str, log_dir: Path, workers: int) -> Proc:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "METIS_TOKEN_OPS": token, "METIS_BIND": f"127.0.0.1:{port}",
           "METIS_WORKERS": str(workers), "METIS_CONFIG_DIR": str(tree / "config"),
           "PROMETHEUS_MULTIPROC_DIR": str(log_dir / f"prom-{name}-{port}"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(tree)}
    argv = [str(Path(sys.executable).parent / "gunicorn"), "-c", str(tree / "shared" / "gunicorn_conf.py"),
            "services.dedupe.app:create_app()"]
    return spawn(f"{name}-{port}", argv, env=env, url=f"http://127.0.0.1:{port}", log_dir=log_dir, cwd=tree)


def wait_all_workers_ready(proc: Proc, timeout: float) -> None:
    """/readyz from every worker: 20 answers in a row, each on a new connection (any worker may take it)."""
    wait_http(proc, "/readyz", timeout=timeout)
    deadline, streak = time.monotonic() + timeout, 0
    while streak < 20:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name}: not every worker became ready:\n{proc.log_tail()}")
        ok = requests.get(proc.url + "/readyz", timeout=10).status_code == 200
        streak = streak + 1 if ok else 0
        time.sleep(0.05 if ok else 0.5)


def session(token: str) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    s.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))
    return s


def index_over_http(s: requests.Session, url: str, tickets: list[dict[str, Any]], in_flight: int,
                    batch: int = 64) -> float:
    chunks = [tickets[i:i + batch] for i in range(0, len(tickets), batch)]

    def send(chunk: list[dict[str, Any]]) -> None:
        r = s.post(url + "/v1/tickets", json={"tickets": chunk}, timeout=600)
        r.raise_for_status()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=in_flight) as ex:
        list(ex.map(send, chunks))
    return len(tickets) / (time.perf_counter() - t0)


def api_tickets(data: Dataset, prefix: str = "") -> list[dict[str, Any]]:
    return [{**{k: v for k, v in t.items() if not k.startswith("_")}, "key": prefix + t["key"]} for t in data.tickets]


def create_db(admin: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    return admin.rsplit("/", 1)[0] + "/" + name


def drop_db(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def build_template(admin: str, data: Dataset, n: int) -> None:
    """The 100k-ticket database, written once with COPY exactly as the API stores rows."""
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEMPLATE,)).fetchone():
            return
    print(f"building template database {TEMPLATE} ({n} tickets; once)", flush=True)
    tmp = TEMPLATE + "_build_" + secrets.token_hex(3)
    url = create_db(admin, tmp)
    try:
        db.migrate(url, "dedupe")
        cfg = load_config(ROOT / "config")
        emb = make_embedder(cfg.embedding)
        real = data.tickets
        texts = [for_embedding(clean(t["summary"]), clean(t["description"]), cfg.embed_max_chars) for t in real]
        vecs = emb.embed(texts)
        rng = random.Random(7)
        nrng = np.random.default_rng(7)
        sentences = [[x for x in re.split(r"(?<=[.!?])\s+", clean(t["description"])) if x][:6] for t in real]
        lex_sum = [" ".join(tokens(clean(t["summary"]))) for t in real]
        components = ["hdfs", "yarn", "mapreduce", "common", "s3a", "abfs", "kms", "tools", "build", "docs"]
        rev = 0
        with psycopg.connect(url) as conn:
            with conn.cursor().copy(
                    "COPY dedupe.tickets (key, project, summary, description, status, resolution, components, "
                    "created, content_hash, row_hash, embedder, embedding, lex_summary, lex_description, rev) "
                    "FROM STDIN") as copy:
                def row(key: str, project: str, summary: str, lex_s: str, desc: str, status: str | None,
                        resolution: str | None, comps: list[str], created: str, v: np.ndarray) -> tuple[object, ...]:
                    nonlocal rev
                    rev += 1
                    lex_d = tokens(for_embedding("", desc, LEXICAL_CHARS))[: cfg.description_tokens]
                    return (key, project, summary, desc[: cfg.description_chars_stored], status, resolution, comps,
                            created, content_hash(emb.name, summary, desc), secrets.token_hex(8), emb.name,
                            v.astype("<f4").tobytes(), lex_s, " ".join(lex_d), rev)

                for t, v, ls in zip(real, vecs, lex_sum):
                    copy.write_row(row(t["key"], "REAL", clean(t["summary"]), ls, clean(t["description"]),
                                       t["status"], t["resolution"], [], t["created"], v))
                for i in range(n - len(real)):
                    a, b, c = rng.randrange(len(real)), rng.randrange(len(real)), rng.randrange(len(real))
                    comp = rng.choice(components)
                    version = f"{rng.randint(2, 3)}.{rng.randint(0, 4)}"
                    summary = f"{clean(real[a]['summary'])} in {comp} {version}"
                    desc = " ".join(sentences[b][:3] + sentences[c][:3])
                    v = vecs[a] + nrng.normal(0, 0.35 / np.sqrt(vecs.shape[1]), vecs.shape[1]).astype(np.float32)
                    v /= np.linalg.norm(v)
                    copy.write_row(row(f"SYN-{i + 1}", "SYN", summary, f"{lex_sum[a]} {comp} {version}", desc,
                                       rng.choice(["Open", "Resolved"]), rng.choice([None, "Fixed"]), [comp],
                                       f"20{rng.randint(15, 19)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T10:00:00Z",
                                       v))
            conn.execute("INSERT INTO dedupe.index_state (id, rev) VALUES (1, %s)", (rev,))
            conn.commit()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {tmp} RENAME TO {TEMPLATE}")
    except BaseException:
        drop_db(admin, tmp)
        raise


def embedder_name(tree: Path) -> str:
    """The embedder name a version's service would write (its config's model and window)."""
    code = ("import sys; from services.dedupe.config import load_config; c = load_config('config').embedding; "
            "b = getattr(c, 'backend', 'torch'); q = 'int8' if c.quantize else 'fp32'; "
            "print(f'all-MiniLM-L6-v2/{c.max_tokens}/' + (f'onnx-{q}' if b == 'onnx' else q))")
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                          check=True, capture_output=True, text=True).stdout.strip()


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(round(q * (len(v) - 1))))], 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=BASELINE, help="git revision measured as 'before'")
    ap.add_argument("--tickets", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--index-rounds", type=int, default=2)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--skip-queries", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dedupe_scale.json"))
    args = ap.parse_args()
    admin = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    data = load_dataset(DATA / "issues.csv", DATA / "duplicate_pairs.csv", prefix="REAL")
    token = "bench-" + secrets.token_hex(16)
    result: dict[str, Any] = {"baseline_rev": args.baseline, "workers": args.workers,
                              "head_rev": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                         capture_output=True, text=True).stdout.strip() + "+worktree"}
    with tempfile.TemporaryDirectory(prefix="metis-dedupe-speed-") as tmp_s:
        tmp = Path(tmp_s)
        trees = {"before": unpack(args.baseline, tmp / "before"), "after": ROOT}
        names = {k: embedder_name(t) for k, t in trees.items()}
        result["embedders"] = names
        logs = tmp / "logs"
        if not args.skip_index:
            result["indexing"] = index_rounds(admin, trees, data, token, logs, args)
            print(json.dumps(result["indexing"], indent=2), flush=True)
        if not args.skip_queries:
            build_template(admin, data, args.tickets)
            result["queries_at_100k"] = query_side_by_side(admin, trees, names, data, token, logs, args)
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2, default=str))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


def index_rounds(admin: str, trees: dict[str, Path], data: Dataset, token: str, logs: Path,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Each round: both versions, one after the other (order alternating), each on a fresh database."""
    rates: dict[str, list[float]] = {k: [] for k in trees}
    loads: dict[str, list[float]] = {k: [] for k in trees}
    per_cpu: dict[str, list[float]] = {k: [] for k in trees}
    tickets = api_tickets(data)
    for r in range(args.index_rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            dbname = f"metis_dedupe_idx_{name}_{secrets.token_hex(3)}"
            url = create_db(admin, dbname)
            proc = start(trees[name], name, url, token, logs, args.workers)
            try:
                wait_all_workers_ready(proc, timeout=900)
                s = session(token)
                # warm-up: one small batch per worker (first-request costs are not indexing throughput)
                index_over_http(s, proc.url, api_tickets(data, "WARM-")[:8], in_flight=2, batch=4)
                workers = children(proc.popen.pid)
                c0 = cpu_seconds(workers)
                rates[name].append(round(index_over_http(s, proc.url, tickets, args.in_flight), 1))
                per_cpu[name].append(round(len(tickets) / max(cpu_seconds(workers) - c0, 1e-9), 1))
                loads[name].append(os.getloadavg()[0])
            finally:
                proc.stop()
                drop_db(admin, dbname)
            print(f"indexing round {r} {name}: {rates[name][-1]} tickets/s, {per_cpu[name][-1]} per worker "
                  f"CPU-second (load {loads[name][-1]:.1f})", flush=True)
    return {"tickets": len(tickets), "batch": 64, "in_flight": args.in_flight,
            "tickets_per_s": rates, "median_tickets_per_s": {k: statistics.median(v) for k, v in rates.items()},
            # tickets per CPU-second of the service's workers (PostgreSQL not counted): what two idle cores
            # would give is about twice this, less PostgreSQL's share
            "tickets_per_worker_cpu_s": per_cpu,
            "median_tickets_per_worker_cpu_s": {k: statistics.median(v) for k, v in per_cpu.items()},
            "load_average_1m": loads}


def query_side_by_side(admin: str, trees: dict[str, Path], names: dict[str, str], data: Dataset, token: str,
                       logs: Path, args: argparse.Namespace) -> dict[str, Any]:
    procs: dict[str, Proc] = {}
    dbs: dict[str, str] = {}
    out: dict[str, Any] = {"startup_to_ready_s": {}, "worker_rss_mb": {}, "tickets_indexed": {}}
    try:
        for name, tree in trees.items():
            dbs[name] = f"metis_dedupe_q_{name}_{secrets.token_hex(3)}"
            url = create_db(admin, dbs[name], template=TEMPLATE)
            with psycopg.connect(url, autocommit=True) as conn:  # rows as this version's embedder wrote them
                conn.execute("UPDATE dedupe.tickets SET embedder = %s", (names[name],))
            t0 = time.perf_counter()
            procs[name] = start(tree, name, url, token, logs, args.workers)
            wait_all_workers_ready(procs[name], timeout=1800)
            out["startup_to_ready_s"][name] = round(time.perf_counter() - t0, 1)
            print(f"{name}: ready in {out['startup_to_ready_s'][name]} s", flush=True)
        sessions = {k: session(token) for k in procs}
        qkeys = [k for k, _ in data.queries] + data.negatives[:: max(1, len(data.negatives) // 134)][:134]
        qkeys = qkeys[: args.queries]
        for name, p in procs.items():  # warm-up: every worker answers a few first
            for k in qkeys[:10]:
                sessions[name].post(p.url + "/v1/duplicates", json={"ticket": {"summary": data.by_key[k]["summary"]}},
                                    timeout=120).raise_for_status()
        lat: dict[str, list[float]] = {k: [] for k in procs}
        loads = []
        workers = {name: children(p.popen.pid) for name, p in procs.items()}
        cpu0 = {name: cpu_seconds(w) for name, w in workers.items()}
        for i, k in enumerate(qkeys):
            t = data.by_key[k]
            body = {"ticket": {"summary": t["summary"], "description": t["description"], "created": t["created"]},
                    "limit": 10, "created_before": t["created"]}
            for name in (list(procs) if i % 2 == 0 else list(reversed(procs))):
                t0 = time.perf_counter()
                r = sessions[name].post(procs[name].url + "/v1/duplicates", json=body, timeout=120)
                lat[name].append(round((time.perf_counter() - t0) * 1000, 2))
                r.raise_for_status()
            if i % 20 == 0:
                loads.append(os.getloadavg()[0])
        out["worker_cpu_ms_per_query"] = {name: round((cpu_seconds(w) - cpu0[name]) * 1000 / len(qkeys), 1)
                                          for name, w in workers.items()}
        for name, p in procs.items():
            out["tickets_indexed"][name] = sessions[name].get(p.url + "/v1/index", timeout=60).json()["tickets"]
            out["worker_rss_mb"][name] = [round(rss_mb(c), 1) for c in children(p.popen.pid)]
        out.update({"queries": len(qkeys), "load_average_1m_during": loads,
                    "p50_ms": {k: pct(v, 0.5) for k, v in lat.items()},
                    "p95_ms": {k: pct(v, 0.95) for k, v in lat.items()},
                    "mean_ms": {k: round(statistics.mean(v), 1) for k, v in lat.items()},
                    "raw_latencies_ms": lat})
        # Indexing with 100k already indexed: 512 new tickets (real texts, new keys), per version.
        new = api_tickets(data, "NEW-")[:: max(1, len(data.tickets) // 512)][:512]
        out["index_rate_with_100k_indexed"] = {
            name: round(index_over_http(sessions[name], p.url, new, args.in_flight), 1) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()
        for name in dbs.values():
            drop_db(admin, name)
    return out


if __name__ == "__main__":
    main()
