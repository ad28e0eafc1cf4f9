"""Digest benchmarks, end to end over HTTP against the digest service under gunicorn and the emulators.

  scan     — 10,000 open defects of 60 clients in Jira (+ Salesforce accounts / cases, Confluence pages):
             POST /v1/digests (weekly, offline narrative), /v1/monitor and /v1/health-scores, each repeated;
             wall time per call and the worker's resident memory (baseline after start-up, peak).
  patterns — 20,000 tickets created over 90 days with planted cross-client problems: POST /v1/patterns
             over the 90-day window cold (no cached embeddings), warm (all cached) and after one more week of
             tickets (steady state), with the service's own split of embedding and clustering time, and how
             many planted problems came back as patterns.

Run: .venv/bin/python benchmarks/digest_bench.py [scan|patterns|all] [--reps 5]
Results: benchmarks/digest_results/<name>.json. The machine is shared: quote medians, compare side by side.
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import psycopg
import requests
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.processes import Proc, free_port, start_service  # noqa: E402
from shared import db  # noqa: E402

ADMIN_URL = os.environ.get("METIS_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RESULTS = ROOT / "benchmarks" / "digest_results"
GITBUGS = ROOT.parent / "shared" / "data" / "gitbugs-hadoop" / "issues.csv"
TOKEN = "bench-n8n-" + secrets.token_hex(12)
CREDS = {"jira_user": "bench@metis.local", "jira_token": "jira-" + secrets.token_hex(8),
         "sf_id": "sf-bench", "sf_secret": secrets.token_hex(12)}
NOW = datetime.now(timezone.utc)
PRIORITIES = [("Blocker", 0.01), ("Highest", 0.02), ("Critical", 0.05), ("High", 0.2), ("Medium", 0.45),
              ("Low", 0.22), ("Lowest", 0.05)]
CLIENTS = [f"client{i:02d}" for i in range(60)]


@dataclass
class Bench:
    database_url: str
    urls: dict[str, str]
    digest: Proc
    workdir: Path

    def post(self, path: str, body: dict[str, Any], timeout: float = 900) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        r = requests.post(self.digest.url + path, json=body, timeout=timeout,
                          headers={"Authorization": f"Bearer {TOKEN}"})
        elapsed = time.perf_counter() - t0
        if r.status_code != 201:
            raise RuntimeError(f"{path} → {r.status_code}: {r.text[:500]}")
        return elapsed, r.json()

    def worker_memory(self) -> dict[str, float]:
        """Resident and peak-resident MiB of the gunicorn worker(s) serving the digest."""
        out = subprocess.run(["pgrep", "-P", str(self.digest.popen.pid)], capture_output=True, text=True).stdout
        rss = hwm = 0.0
        for pid in out.split():
            status = Path(f"/proc/{pid}/status").read_text()
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1]) / 1024
        return {"rss_mib": round(rss, 1), "peak_rss_mib": round(hwm, 1)}


@contextmanager
def bench_stack() -> Iterator[Bench]:
    """Fresh database, the emulators and the digest service (one gunicorn worker), all on free ports."""
    name = f"metis_bench_digest_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    db.migrate(url, "digest")
    tmp = Path(tempfile.mkdtemp(prefix="metis-bench-digest-"))
    ready = tmp / "ready.json"
    argv = [sys.executable, "-m", "emulators", "--host", "127.0.0.1", "--ready-file", str(ready),
            "--jira-user", CREDS["jira_user"], "--jira-token", CREDS["jira_token"],
            "--salesforce-client-id", CREDS["sf_id"], "--salesforce-client-secret", CREDS["sf_secret"]]
    for svc in ("anthropic", "jira", "slack", "smtp", "mail", "confluence", "salesforce"):
        argv += [f"--{svc}-port", "0"]
    emu = subprocess.Popen(argv, cwd=ROOT, stdout=open(tmp / "emulators.log", "ab"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    proc = None
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if emu.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "emulators.log").read_text())
            time.sleep(0.05)
        urls = json.loads(ready.read_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith("METIS_")}
        env.update({
            "DATABASE_URL": url, "METIS_CONFIG_DIR": str(ROOT / "config"), "METIS_LOG_LEVEL": "WARNING",
            "METIS_TOKEN_N8N": TOKEN, "METIS_TOKEN_DIGEST": "bench-digest-" + secrets.token_hex(12),
            "METIS_JIRA_URL": urls["jira"], "METIS_JIRA_EMAIL": CREDS["jira_user"],
            "METIS_JIRA_API_TOKEN": CREDS["jira_token"], "METIS_CONFLUENCE_URL": urls["confluence"],
            "METIS_SALESFORCE_URL": urls["salesforce"], "METIS_SALESFORCE_CLIENT_ID": CREDS["sf_id"],
            "METIS_SALESFORCE_CLIENT_SECRET": CREDS["sf_secret"],
            # No guardrails: the narrative is the offline template (the target is "without the LLM").
            "METIS_GUARDRAILS_URL": f"http://127.0.0.1:{free_port()}",
            "METIS_WORKER_TIMEOUT": "900",
        })
        proc = start_service("digest", env=env, port=free_port(), log_dir=tmp, workers=1)
        yield Bench(url, urls, proc, tmp)
    finally:
        if proc:
            proc.stop()
        emu.terminate()
        emu.wait(10)
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _post(url: str, body: Any) -> Any:
    r = requests.post(url, json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def ago(days: float) -> str:
    return (NOW - timedelta(days=days)).isoformat()


def gitbugs_texts() -> list[tuple[str, str]]:
    """(summary, description) of real Jira bug reports (gitbugs-hadoop, CC BY 4.0)."""
    with open(GITBUGS, newline="") as fh:
        return [(r["Summary"][:250], " ".join(r["Description"].split())[:1500]) for r in csv.DictReader(fh)]


def seed_world(b: Bench, rng: random.Random, n: int = 10_000) -> None:
    """n open defects of 60 clients, with duplicates, blockers, flags, reopenings; accounts, cases, pages."""
    texts = gitbugs_texts()
    prios = [p for p, _ in PRIORITIES]
    weights = [w for _, w in PRIORITIES]
    issues = []
    for i in range(n):
        summary, desc = texts[i % len(texts)]
        created = rng.uniform(0, 180)
        item: dict[str, Any] = {
            "key": f"PAY-{i + 1}", "summary": summary, "description": desc[:600] or None, "issuetype": "Bug",
            "priority": rng.choices(prios, weights)[0], "client": rng.choice(CLIENTS),
            "created": ago(created), "updated": ago(rng.uniform(0, min(created, 40))),
            "status": rng.choices(["To Do", "In Progress", "Waiting for Customer"], [0.5, 0.4, 0.1])[0],
            "components": [rng.choice(["Payslips", "Tax", "Leave", "Rostering", "Integrations", "Reports"])],
            "labels": (["escalated"] if rng.random() < 0.03 else []) +
                      ([f"client-{rng.choice(CLIENTS)}"] if rng.random() < 0.1 else []),
            "flagged": rng.random() < 0.01,
        }
        if rng.random() < 0.08:
            item["fields"] = {"customfield_10102": rng.randint(1, 3)}
        links = []
        if i > 10 and rng.random() < 0.05:
            links.append({"type": "Duplicate", "inward": f"PAY-{rng.randint(1, i)}"})
        if i > 10 and rng.random() < 0.02:
            links.append({"type": "Blocks", "inward": f"PAY-{rng.randint(1, i)}"})
        if links:
            item["links"] = links
        issues.append(item)
    for start in range(0, n, 2000):
        _post(b.urls["jira"] + "/_emulator/jira/issues", {"issues": issues[start:start + 2000]})
    pages = _post(b.urls["confluence"] + "/_emulator/confluence/pages",
                  {"pages": [{"title": f"{c} configuration", "space": "CFG",
                              "versions": [{"body": "v1", "created": ago(rng.uniform(1, 400))}]} for c in CLIENTS]})["ids"]
    accounts = [{"Id": f"001BENCH{i:010d}", "Name": f"{c.title()} Ltd", "AnnualRevenue": rng.randint(50, 5000) * 1000,
                 "Metis_Client_Key__c": c, "Renewal_Date__c": (NOW + timedelta(days=rng.randint(-10, 400))).date().isoformat(),
                 "Config_Doc_Page_Id__c": pages[i], "Config_Last_Changed__c": ago(rng.uniform(1, 200))}
                for i, c in enumerate(CLIENTS)]
    _post(b.urls["salesforce"] + "/_emulator/salesforce/records", {"object": "Account", "records": accounts})
    cases = [{"AccountId": rng.choice(accounts)["Id"], "Subject": "case", "Status": rng.choice(["New", "Working"]),
              "IsEscalated": rng.random() < 0.1} for _ in range(600)]
    _post(b.urls["salesforce"] + "/_emulator/salesforce/records", {"object": "Case", "records": cases})


def run_scan(reps: int) -> dict[str, Any]:
    rng = random.Random(7)
    with bench_stack() as b:
        t0 = time.perf_counter()
        seed_world(b, rng)
        seeded = time.perf_counter() - t0
        baseline = b.worker_memory()
        out: dict[str, Any] = {"tickets": 10_000, "clients": len(CLIENTS), "seed_seconds": round(seeded, 1),
                               "memory_after_start": baseline, "jobs": {}}
        for job, path, body in (("weekly", "/v1/digests", {"narrative": "offline", "limit": 10}),
                                ("monitor", "/v1/monitor", {}), ("health", "/v1/health-scores", {})):
            times = []
            last: dict[str, Any] = {}
            for _ in range(reps):
                elapsed, last = b.post(path, body)
                times.append(elapsed)
            out["jobs"][job] = {"seconds": [round(t, 2) for t in times], "median_s": round(statistics.median(times), 2),
                                "max_s": round(max(times), 2), "summary": last["summary"],
                                "service_timings_last": last["data"].get("timings"),
                                "response_bytes": len(json.dumps(last)), "memory": b.worker_memory()}
            print(job, out["jobs"][job]["median_s"], "s median;", out["jobs"][job]["memory"],
                  out["jobs"][job]["service_timings_last"], flush=True)
        out["memory_peak"] = b.worker_memory()
        return out


PROBLEMS = [
    ("Payslip PDF is blank after the pay run", ["Payslip PDF comes out empty once the pay run finishes",
                                                 "Blank payslip PDFs generated by the latest pay run",
                                                 "Employees receive empty payslip PDF after payroll run"]),
    ("Overtime rate not applied on public holidays", ["Public holiday overtime paid at the normal rate",
                                                      "Holiday overtime multiplier ignored in pay calculation",
                                                      "Overtime on public holidays is calculated without penalty rate"]),
    ("Single Touch Payroll submission rejected by ATO", ["STP pay event rejected by the tax office",
                                                         "ATO rejects our Single Touch Payroll lodgement",
                                                         "STP submission fails with rejection from ATO"]),
    ("Leave balance doubles after timesheet import", ["Annual leave balance doubled when importing timesheets",
                                                      "Timesheet import duplicates leave accrual",
                                                      "Leave accruals counted twice after timesheet upload"]),
    ("Superannuation guarantee calculated on wrong earnings", ["Super guarantee uses the wrong earnings base",
                                                               "SG contribution computed on incorrect pay items",
                                                               "Superannuation calculated on ordinary time earnings wrongly"]),
    ("Roster shifts disappear after publishing", ["Published roster loses shifts",
                                                  "Shifts vanish from the roster once it is published",
                                                  "After publishing the roster some shifts are missing"]),
    ("Bank file export has wrong BSB format", ["ABA bank file exports BSB in the wrong format",
                                               "Bank payment file BSB numbers malformed",
                                               "Exported bank file rejected: invalid BSB format"]),
    ("Casual loading missing from weekend shifts", ["Weekend shifts paid without casual loading",
                                                    "Casual loading not added for Saturday and Sunday shifts",
                                                    "Casual employees miss loading on weekend work"]),
]


CONTEXTS = ["after upgrade", "since last week", "for casual staff", "in the March pay run", "on mobile",
            "for new starters", "in the Sydney entity", "for salaried employees", "after the hotfix", "intermittently"]


# Sentences people write (not stack frames, imports, build logs or URLs): tickets, not log pastes.
CODE = re.compile(r"\.java|org\.apache|\bimport |\[(?:INFO|ERROR|WARNING)\]|https?://|^at |\bat [a-z]+\.[a-z]|[{}<>=`]|^\W")


class TextPool:
    """Distinct one-line texts about software behaving (badly), each handed out once: summaries and
    description sentences of real bug reports (gitbugs-hadoop, minus stack frames, imports and log lines)
    and first lines of docstrings of the installed scientific packages (~30,000 in all). Background
    tickets then cluster only where their texts really are alike; the recurring problems are the planted
    ones."""

    PACKAGES = ("scipy", "sklearn", "numpy", "sympy", "networkx", "torch")

    CACHE = Path(os.environ.get("METIS_CACHE", str(Path.home() / ".cache" / "metis"))) / "digest-text-pool-v1.json"

    def __init__(self, rng: random.Random) -> None:
        if self.CACHE.exists():
            self.items = json.loads(self.CACHE.read_text())
        else:
            self.items = sorted(self._build())
            self.CACHE.parent.mkdir(parents=True, exist_ok=True)
            self.CACHE.write_text(json.dumps(self.items))
        rng.shuffle(self.items)
        self.rng = rng
        self.i = 0

    def _build(self) -> set[str]:
        pool: set[str] = set()
        with open(GITBUGS, newline="") as fh:
            rows = [(r["Summary"], r["Description"]) for r in csv.DictReader(fh)]
        for summary, desc in rows:
            pool.add(summary.strip())
            for raw in re.split(r"(?<=[.!?])\s+|\n+", desc):
                self._add(pool, raw)
        site = Path(sysconfig.get_paths()["purelib"])
        for pkg in self.PACKAGES:
            for path in sorted((site / pkg).rglob("*.py")):
                try:
                    tree = ast.parse(path.read_text(errors="replace"))
                except (SyntaxError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        doc = ast.get_docstring(node)
                        if doc:
                            self._add(pool, doc.strip().split("\n\n")[0])
        return pool

    @staticmethod
    def _add(pool: set[str], raw: str) -> None:
        sentence = " ".join(raw.split())
        if (30 <= len(sentence) <= 200 and not CODE.search(sentence)
                and len(re.findall(r"\b[a-z]{3,}\b", sentence)) >= 4):
            pool.add(sentence)

    def next(self) -> tuple[str, str]:
        text = self.items[self.i % len(self.items)]
        if self.i >= len(self.items):
            text = f"{text} ({self.rng.choice(CONTEXTS)})"
        self.i += 1
        return text, text


def seed_patterns(b: Bench, rng: random.Random, pool: TextPool, n: int, days: float, key_offset: int = 0,
                  age_offset: float = 0.0) -> dict[str, list[str]]:
    """n tickets created over `days`: real bug-report texts plus planted cross-client problems (~2 %)."""
    planted: dict[str, list[str]] = {}
    issues = []
    for i in range(n):
        key = f"SUP-{key_offset + i + 1}"
        client = rng.choice(CLIENTS)
        if rng.random() < 0.02:
            base, variants = rng.choice(PROBLEMS)
            summary = rng.choice([base, *variants])
            desc = f"Reported by {client}. {summary} {rng.choice(CONTEXTS)}."
            planted.setdefault(base, []).append(key)
        else:
            summary, desc = pool.next()
        issues.append({"key": key, "summary": summary[:250], "description": desc[:800] or None, "issuetype": "Bug",
                       "priority": rng.choice(["High", "Medium", "Low"]), "client": client,
                       "created": ago(age_offset + rng.uniform(0, days))})
    for start in range(0, n, 2000):
        _post(b.urls["jira"] + "/_emulator/jira/issues", {"issues": issues[start:start + 2000]})
    return planted


def run_patterns(description_chars: int | None, similarity: float | None) -> dict[str, Any]:
    rng = random.Random(11)
    rules: dict[str, Any] = {"window_days": 90}
    if description_chars is not None:
        rules["description_chars"] = description_chars
    if similarity is not None:
        rules["similarity"] = similarity
    with bench_stack() as b:
        pool = TextPool(rng)
        planted = seed_patterns(b, rng, pool, 20_000, 90)
        out: dict[str, Any] = {"tickets_in_window": 20_000, "window_days": 90, "rules": rules, "runs": {}}
        for label in ("cold", "warm"):
            elapsed, d = b.post("/v1/patterns", {"rules": rules})
            out["runs"][label] = {"seconds": round(elapsed, 1), "timings": d["data"]["timings"],
                                  "embedded": d["data"]["embedded"], "patterns": len(d["data"]["patterns"]),
                                  "memory": b.worker_memory()}
            print(label, out["runs"][label], flush=True)
        # A week later: 1,600 new tickets (the weekly volume at this rate), the oldest week leaves the window.
        more = seed_patterns(b, rng, pool, 1_600, 7, key_offset=20_000, age_offset=-7.0)
        for base, keys in more.items():
            planted.setdefault(base, []).extend(keys)
        later = (NOW + timedelta(days=7)).isoformat()
        elapsed, d = b.post("/v1/patterns", {"rules": rules, "now": later})
        out["runs"]["next_week"] = {"seconds": round(elapsed, 1), "timings": d["data"]["timings"],
                                    "embedded": d["data"]["embedded"], "patterns": len(d["data"]["patterns"]),
                                    "memory": b.worker_memory()}
        print("next_week", out["runs"]["next_week"], flush=True)
        found = d["data"]["patterns"]
        recovered = {}
        for base, keys in planted.items():
            keyset = set(keys)
            best = max((len(keyset & {t["key"] for t in p["tickets"]}) for p in found), default=0)
            recovered[base] = {"planted": len(keys), "largest_overlap": best}
        out["planted"] = recovered
        out["planted_found"] = sum(1 for r in recovered.values() if r["largest_overlap"] >= 3)
        out["top_patterns"] = [{"representative": p["representative"]["summary"], "count": p["count"],
                                "clients": len(p["clients"]), "trend": p["trend"]} for p in found[:12]]
        return out


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average": os.getloadavg(), "cpus": os.cpu_count(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["scan", "patterns", "all"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--description-chars", type=int, default=None,
                   help="override patterns.description_chars (default: config/digest.yaml)")
    p.add_argument("--similarity", type=float, default=None, help="override patterns.similarity")
    args = p.parse_args()
    if args.what in ("scan", "all"):
        print(save("scan_10k", run_scan(args.reps)))
    if args.what in ("patterns", "all"):
        suffix = "" if args.description_chars is None else f"_desc{args.description_chars}"
        suffix += "" if args.similarity is None else f"_sim{args.similarity:g}"
        print(save(f"patterns_20k{suffix}", run_patterns(args.description_chars, args.similarity)))


if __name__ == "__main__":
    main()
