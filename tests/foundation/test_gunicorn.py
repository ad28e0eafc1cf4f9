"""A service under real gunicorn with two workers: auth over real HTTP, metrics aggregated across workers."""
from __future__ import annotations

import os
import re

import requests

from devstack.processes import free_port, start_service
from tests.conftest import TEST_TOKENS, auth


def test_two_workers_share_one_metrics_view(database_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url,
           **{f"METIS_TOKEN_{k.upper()}": v.get() for k, v in TEST_TOKENS.items()}}
    proc = start_service("watch", env=env, port=free_port(), log_dir=tmp_path, workers=2)
    try:
        assert requests.get(proc.url + "/v1/whoami", timeout=5).status_code == 401
        session = requests.Session()
        for _ in range(40):
            r = requests.get(proc.url + "/v1/whoami", headers=auth("ops"), timeout=5)
            assert r.status_code == 200 and r.json()["caller"] == "ops"
        text = session.get(proc.url + "/metrics", timeout=5).text
        m = re.search(r'metis_http_requests_total\{endpoint="/v1/whoami",method="GET",service="watch",'
                      r'status="200"\} (\d+\.\d+)', text)
        assert m, text[:2000]
        # 40 successful calls, whichever worker served them, counted once each across both workers.
        assert float(m.group(1)) == 40.0
        assert len(list((tmp_path / f"prom-watch-{proc.url.rsplit(':', 1)[1]}").glob("counter_*.db"))) >= 1
    finally:
        proc.stop()
