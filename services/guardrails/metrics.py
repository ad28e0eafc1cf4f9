"""Guardrails metrics: per-process counters (aggregated across workers) and gauges read from PostgreSQL at scrape."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    from .gateway import Usage
    from .policy import Price
    from .service import PolicyStore

log = logging.getLogger(__name__)

SPEND_USD = Counter("metis_llm_spend_usd_total", "LLM spend in USD by task, model and token kind",
                    ["task", "model", "kind"])
TOKENS = Counter("metis_llm_tokens_total", "LLM tokens by task, model and token kind", ["task", "model", "kind"])
CACHE_SAVINGS_USD = Counter("metis_llm_cache_savings_usd_total",
                            "USD saved by cache reads versus paying the uncached input price", ["task", "model"])
CACHE_WRITE_PREMIUM_USD = Counter("metis_llm_cache_write_premium_usd_total",
                                  "USD paid for cache writes above the uncached input price", ["task", "model"])
CALLS = Counter("metis_llm_calls_total", "LLM calls settled through the gateway", ["task", "model"])
DENIALS = Counter("metis_guardrails_denials_total", "Requests refused by guardrails, by reason", ["reason"])
UPSTREAM_ERRORS = Counter("metis_llm_upstream_errors_total", "Non-200 answers from the Anthropic API", ["status"])
OVERRUNS = Counter("metis_llm_reservation_overruns_total", "Settlements that exceeded their reservation")
OPEN_RESERVATIONS = Gauge("metis_llm_inflight_calls", "LLM calls in flight through this gateway",
                          multiprocess_mode="livesum")


_children: dict[tuple[Any, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once per label set (labels() validates and locks on every call)."""
    key = (metric, *labels)
    c = _children.get(key)
    if c is None:
        c = _children[key] = metric.labels(*labels)
    return c


def observe_spend(task: str, model: str, price: "Price", usage: "Usage", kinds_nanos: dict[str, int]) -> None:
    """Count one settled call's tokens and dollars per kind, and what caching saved or cost."""
    child(CALLS, task, model).inc()
    for kind, nanos in kinds_nanos.items():
        tokens = getattr(usage, kind)
        if tokens:
            child(TOKENS, task, model, kind).inc(tokens)
            child(SPEND_USD, task, model, kind).inc(nanos / 1e9)
    if usage.cache_read:
        child(CACHE_SAVINGS_USD, task, model).inc(usage.cache_read * (price.input - price.cache_read) / 1e9)
    premium = usage.cache_write_5m * (price.cache_write_5m - price.input) + \
        usage.cache_write_1h * (price.cache_write_1h - price.input)
    if premium > 0:
        child(CACHE_WRITE_PREMIUM_USD, task, model).inc(premium / 1e9)


class LedgerCollector(Collector):
    """Budget, kill switch, heartbeat and reservation gauges straight from the database (replica-independent)."""

    def __init__(self, pool: "ConnectionPool", policies: "PolicyStore") -> None:
        self._pool = pool
        self._policies = policies

    def collect(self) -> Iterator[Any]:
        from . import repository as repo
        from .service import budget_view, heartbeat_list, kill_switch_state

        up = GaugeMetricFamily("metis_guardrails_ledger_up", "1 if the ledger database answered this scrape")
        try:
            policy = self._policies.get()
            with self._pool.connection(timeout=2.0) as conn:
                caps = budget_view(policy, conn)
                ks = kill_switch_state(conn)
                hbs = heartbeat_list(conn=conn, policy=policy)
                res = repo.reservations_open_summary(conn)
                pending = conn.execute("SELECT count(*) FROM guardrails.alert_outbox "
                                       "WHERE delivered_at IS NULL").fetchone()
                pending = tuple(pending.values()) if isinstance(pending, dict) else pending
        except Exception:  # a scrape reports the failure as a metric instead of failing the whole page
            log.warning("ledger metrics unavailable", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        labels = ["cap", "scope", "task"]
        fams = {name: GaugeMetricFamily(f"metis_budget_{name}_usd", help_, labels=labels) for name, help_ in (
            ("limit", "Cap in USD for the current period"), ("spent", "Settled spend in USD this period"),
            ("reserved", "Reserved (in-flight worst case) USD this period"),
            ("remaining", "USD left under the cap this period"))}
        ratio = GaugeMetricFamily("metis_budget_used_ratio", "(spent + reserved) / limit", labels=labels)
        for cap in caps:
            # Stable label values (no dates) so series and alert rules survive the period roll-over.
            lv = [f"task:{cap['task']}" if cap["task"] else cap["scope"], cap["scope"], cap["task"] or ""]
            fams["limit"].add_metric(lv, cap["limit_micros"] / 1e6)
            fams["spent"].add_metric(lv, cap["spent_micros"] / 1e6)
            fams["reserved"].add_metric(lv, cap["reserved_micros"] / 1e6)
            fams["remaining"].add_metric(lv, cap["remaining_micros"] / 1e6)
            used = cap["spent_micros"] + cap["reserved_micros"]
            ratio.add_metric(lv, used / cap["limit_micros"] if cap["limit_micros"] else 1.0)
        yield from fams.values()
        yield ratio
        kill = GaugeMetricFamily("metis_kill_switch_engaged", "1 while the kill switch is engaged")
        kill.add_metric([], 1 if ks["engaged"] else 0)
        yield kill
        age = GaugeMetricFamily("metis_heartbeat_age_seconds", "Seconds since the last check-in", labels=["name"])
        interval = GaugeMetricFamily("metis_heartbeat_max_age_seconds", "Interval + grace from policy",
                                     labels=["name"])
        overdue = GaugeMetricFamily("metis_heartbeat_overdue", "1 while a heartbeat is overdue", labels=["name"])
        for hb in hbs:
            if hb["age_seconds"] is not None:
                age.add_metric([hb["name"]], hb["age_seconds"])
            interval.add_metric([hb["name"]], hb["interval_seconds"] + hb["grace_seconds"])
            overdue.add_metric([hb["name"]], 1 if hb["status"] in ("overdue", "late") else 0)
        yield age
        yield interval
        yield overdue
        n = GaugeMetricFamily("metis_llm_open_reservations", "Reservations not yet settled (all replicas)")
        n.add_metric([], int(res["n"]))
        yield n
        amt = GaugeMetricFamily("metis_llm_open_reservations_usd", "USD held by unsettled reservations")
        amt.add_metric([], int(res["micros"]) / 1e6)
        yield amt
        outbox = GaugeMetricFamily("metis_alerts_pending", "Alerts queued and not yet delivered")
        outbox.add_metric([], int(pending[0]) if pending else 0)
        yield outbox
