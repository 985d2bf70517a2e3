"""`GET /metrics` of `storelink hq serve`: fleet-level gauges for Prometheus, read from the database at scrape time.

A custom collector on a registry of its own (not prometheus-client's global one), like the store's /metrics, so
every figure is what the database says at that moment. Per-store series are deliberately absent: 5,000 stores x
a dozen gauges belongs in the database and the dashboard, not in Prometheus; alert on the fleet figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from storelink.hq.alerts import KINDS
from storelink.hq.db import Database
from storelink.hq.summary import PROBLEMS


class FleetCollector(Collector):
    def __init__(self, db: Database):
        self.db = db

    def collect(self) -> Iterator[Metric]:
        db, now = self.db, time.time()
        online, offline, unknown, depth, oldest, last_event = db.query(
            "SELECT sum(CASE WHEN online = 1 THEN 1 ELSE 0 END), sum(CASE WHEN online = 0 THEN 1 ELSE 0 END), "
            "sum(CASE WHEN online IS NULL THEN 1 ELSE 0 END), coalesce(sum(outbox_depth), 0), min(outbox_oldest_at), "
            "max(last_event_at) FROM stores")[0]
        stores = GaugeMetricFamily("storelink_fleet_stores", "stores by link state", labels=["state"])
        for state, n in (("online", online), ("offline", offline), ("unknown", unknown)):
            stores.add_metric([state], float(n or 0))
        yield stores
        counts: dict[str, int] = dict(db.query("SELECT problem, count(*) FROM store_problems GROUP BY problem"))
        problems = GaugeMetricFamily("storelink_fleet_stores_with_problem", "stores showing each problem",
                                     labels=["problem"])
        for p in PROBLEMS:
            problems.add_metric([p], float(counts.get(p, 0)))
        yield problems
        open_alerts: dict[str, int] = dict(db.query(
            "SELECT kind, count(*) FROM alerts WHERE closed_at IS NULL GROUP BY kind"))
        alerts = GaugeMetricFamily("storelink_fleet_alerts_open", "open alerts by kind", labels=["kind"])
        for k in KINDS:
            alerts.add_metric([k], float(open_alerts.get(k, 0)))
        yield alerts
        yield GaugeMetricFamily("storelink_fleet_outbox_depth", "events waiting in all stores' outboxes (as last "
                                "reported)", float(depth or 0))
        yield GaugeMetricFamily("storelink_fleet_outbox_oldest_age_seconds", "age of the oldest undelivered event "
                                "in any store", max(0.0, now - oldest) if oldest else 0.0)
        yield GaugeMetricFamily("storelink_fleet_last_event_age_seconds", "seconds since head office landed the "
                                "newest event", max(0.0, now - last_event) if last_event else 0.0)
        gaps: dict[str, int] = dict(db.query(
            "SELECT state, coalesce(sum(last_seq - first_seq + 1), 0) FROM seq_gaps GROUP BY state"))
        gap = GaugeMetricFamily("storelink_fleet_seq_gap_events", "events in seq gaps by state (open: waiting for "
                                "late events or the store's report; evicted; missing)", labels=["state"])
        for state in ("open", "evicted", "missing"):
            gap.add_metric([state], float(gaps.get(state, 0)))
        yield gap
        latest = db.query("SELECT max(version), count(*) FROM price_batches")[0]
        yield GaugeMetricFamily("storelink_fleet_price_version_latest", "newest price version published",
                                float(latest[0] or 0))
        yield CounterMetricFamily("storelink_fleet_bad_messages", "messages head office could not ingest",
                                  float(db.query("SELECT count(*) FROM bad_messages")[0][0]))
        labels = ["worker"]
        beat = GaugeMetricFamily("storelink_ingest_heartbeat_age_seconds",
                                 "seconds since a worker's last commit or heartbeat", labels=labels)
        counters = {name: CounterMetricFamily(f"storelink_ingest_{name}", f"messages {name} by a worker",
                                              labels=labels)
                    for name in ("received", "inserted", "duplicates", "bad")}
        for worker, heartbeat, *values in db.query("SELECT worker, heartbeat_at, received_total, inserted_total, "
                                                   "duplicates_total, bad_total FROM workers"):
            beat.add_metric([worker], max(0.0, now - heartbeat))
            for family, value in zip(counters.values(), values, strict=True):
                family.add_metric([worker], float(value))
        yield beat
        yield from counters.values()


def render(db: Database) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(db))
    return generate_latest(registry), CONTENT_TYPE_LATEST
