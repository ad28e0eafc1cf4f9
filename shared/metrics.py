"""Prometheus metrics that stay correct under several gunicorn workers (multiprocess mode)."""
from __future__ import annotations

import os
import time
from typing import Iterable

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import REGISTRY, multiprocess
from prometheus_client.registry import Collector

HTTP_REQUESTS = Counter("metis_http_requests_total", "HTTP requests served",
                        ["service", "method", "endpoint", "status"])
HTTP_LATENCY = Histogram("metis_http_request_duration_seconds", "HTTP request latency",
                         ["service", "endpoint"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


def metrics_response(extra: Iterable[Collector] = ()) -> Response:
    """Aggregate every worker's samples when PROMETHEUS_MULTIPROC_DIR is set; `extra` collectors are read at
    scrape time (e.g. gauges computed from the database, the same whichever worker answers)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        data = generate_latest(registry)
    else:
        data = generate_latest(REGISTRY)
    collectors = list(extra)
    if collectors:
        scraped = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            scraped.register(collector)
        data += generate_latest(scraped)
    return Response(data, mimetype=CONTENT_TYPE_LATEST)


def instrument(app: Flask, service: str) -> None:
    @app.before_request
    def _start() -> None:
        g._t0 = time.perf_counter()

    @app.after_request
    def _observe(resp: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        t0 = g.get("_t0")
        if t0 is not None:
            HTTP_LATENCY.labels(service, endpoint).observe(time.perf_counter() - t0)
        HTTP_REQUESTS.labels(service, request.method, endpoint, str(resp.status_code)).inc()
        return resp
