"""Write-side gauges read from PostgreSQL at scrape time: actions by status, the oldest pending approval, actions
stuck executing, failed actions waiting for an operator, open escalations, undelivered n8n hand-offs."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator, cast

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

_QUERY = """
SELECT (SELECT coalesce(jsonb_object_agg(status, n), '{}'::jsonb)
          FROM (SELECT status, count(*) AS n FROM guardrails.actions GROUP BY status) s) AS by_status,
       (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)
          FROM guardrails.actions WHERE status = 'pending_approval') AS oldest_pending_seconds,
       (SELECT count(*) FROM guardrails.actions WHERE status = 'executing' AND lease_until < now()) AS abandoned,
       (SELECT count(*) FROM guardrails.escalations WHERE status = 'open') AS open_escalations,
       (SELECT count(*) FROM guardrails.notify_outbox WHERE delivered_at IS NULL) AS undelivered
"""
STATUSES = ("denied", "pending_approval", "approved", "executing", "executed", "failed", "rejected", "expired")


class ActionsCollector(Collector):
    """Gauges that let ops alert on approvals nobody answers and writes that failed."""

    def __init__(self, pool: "ConnectionPool") -> None:
        self._pool = pool

    def collect(self) -> Iterator[Any]:
        try:
            with self._pool.connection(timeout=2.0) as conn:
                row = cast("dict[str, Any] | None", conn.execute(_QUERY).fetchone())
        except Exception:  # the ledger collector already reports database trouble (metis_guardrails_ledger_up)
            log.warning("actions metrics unavailable", exc_info=True)
            return
        assert row is not None
        actions = GaugeMetricFamily("metis_guardrails_actions", "Write proposals by status", labels=["status"])
        for status in STATUSES:
            actions.add_metric([status], float(row["by_status"].get(status, 0)))
        yield actions
        yield GaugeMetricFamily("metis_guardrails_oldest_pending_approval_seconds",
                                "Age of the oldest action waiting for a human (0: none)",
                                value=float(row["oldest_pending_seconds"]))
        yield GaugeMetricFamily("metis_guardrails_actions_abandoned", "Executions whose worker stopped (recovering)",
                                value=float(row["abandoned"]))
        yield GaugeMetricFamily("metis_guardrails_escalations_open", "Escalations nobody has closed",
                                value=float(row["open_escalations"]))
        yield GaugeMetricFamily("metis_guardrails_notify_undelivered",
                                "Approval requests and escalations not yet handed to n8n",
                                value=float(row["undelivered"]))
