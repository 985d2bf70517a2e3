"""``GET /metrics``: Prometheus exposition via prometheus-client, read from the status at scrape time.

A custom collector on the gateway's own registry (not the process-global one) so that two gateways in one
test process never share series, and so that every figure is exactly what the status API says at that moment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from storelink.outbox import AcceptedEvent, Outbox
from storelink.parts import BasePart, PartState
from storelink.remote.commands import Commands

DEVICE_STATES = ("ok", "degraded", "offline")
CONFIG_RESULTS = ("applied", "accepted", "rejected", "rolled_back")
MAX_KINDS = 200  # event kinds counted by name; the ingest API accepts any well-formed kind, so the rest are "other"


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class EventCounts:
    """Events accepted since start, by kind: the outbox's listener hook."""

    def __init__(self) -> None:
        self.by_kind: dict[str, int] = {}

    def hear(self, events: Sequence[AcceptedEvent]) -> None:
        for e in events:
            kind = e.kind if e.kind in self.by_kind or len(self.by_kind) < MAX_KINDS else "other"
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


class GatewayCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]], commands: Commands, events: EventCounts):
        self.status = status
        self.commands = commands
        self.events = events

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        up, ob = status["uplink"], status["outbox"]
        yield GaugeMetricFamily("storelink_uptime_seconds", "seconds since the gateway started",
                                _num(status["uptime_s"]))
        yield GaugeMetricFamily("storelink_uplink_connected", "1 when connected to the broker",
                                1.0 if up["connected"] else 0.0)
        yield GaugeMetricFamily("storelink_uplink_in_flight", "events published, awaiting PUBACK",
                                _num(up["in_flight"]))
        yield GaugeMetricFamily("storelink_outbox_depth", "events waiting in the outbox", _num(ob["depth"]))
        yield GaugeMetricFamily("storelink_outbox_bytes", "payload bytes waiting in the outbox", _num(ob["bytes"]))
        yield GaugeMetricFamily("storelink_outbox_oldest_age_seconds", "age of the oldest undelivered event",
                                _num(ob["oldest_undelivered_age_s"]))
        for name in ("accepted", "delivered", "evicted", "refused"):
            yield CounterMetricFamily(f"storelink_outbox_{name}", f"events {name} since start",
                                      _num(ob[f"{name}_total"]))
        alarms = GaugeMetricFamily("storelink_outbox_alarm", "1 while an outbox alarm is raised", labels=["alarm"])
        for alarm in ob["alarms"]:
            alarms.add_metric([alarm], 1.0)
        yield alarms

        state = GaugeMetricFamily("storelink_device_state", "1 for the state each device is in",
                                  labels=["device", "driver", "state"])
        restarts = CounterMetricFamily("storelink_device_restarts", "driver restarts", labels=["device"])
        for dev in status["devices"]:
            for s in DEVICE_STATES:
                state.add_metric([dev["device"], dev["driver"], s], 1.0 if dev["state"] == s else 0.0)
            restarts.add_metric([dev["device"]], _num(dev.get("restarts")))
        yield state
        yield restarts

        config = status.get("config") or {}
        yield GaugeMetricFamily("storelink_config_version", "running config version", _num(config.get("version")))
        last = (config.get("last_result") or {}).get("status")
        result = GaugeMetricFamily("storelink_config_last_result", "1 for the last remote config result",
                                   labels=["status"])
        for s in CONFIG_RESULTS:
            result.add_metric([s], 1.0 if last == s else 0.0)
        yield result

        prices = status.get("prices")
        if isinstance(prices, dict) and "active_version" in prices:
            yield GaugeMetricFamily("storelink_prices_active_version", "active price version",
                                    _num(prices["active_version"]))
            stale = sum(1 for d in (prices.get("devices") or {}).values() if d.get("state") == "stale")
            yield GaugeMetricFamily("storelink_prices_stale_devices", "price devices behind the active version",
                                    float(stale))

        cmds = CounterMetricFamily("storelink_commands", "commands handled", labels=["command", "outcome"])
        for (name, outcome), n in sorted(self.commands.counts.items()):
            cmds.add_metric([name, outcome], float(n))
        yield cmds

        events = CounterMetricFamily("storelink_events_accepted", "events accepted since start", labels=["kind"])
        for kind, n in sorted(self.events.by_kind.items()):
            events.add_metric([kind], float(n))
        yield events
        refused = CounterMetricFamily("storelink_rejections", "input refused at a boundary (docs/operations.md)",
                                      labels=["surface", "reason"])
        for key, n in sorted(status.get("rejections", {}).items()):
            surface, _, reason = key.partition(":")
            refused.add_metric([surface, reason], float(n))
        yield refused


        up = GaugeMetricFamily("storelink_part_running", "1 while a part runs", labels=["part"])
        restarts = CounterMetricFamily("storelink_part_restarts", "part restarts after a failure", labels=["part"])
        for name, part in sorted(status.get("parts", {}).items()):
            up.add_metric([name], 1.0 if part["state"] == PartState.RUNNING else 0.0)
            restarts.add_metric([name], _num(part["restarts"]))
        yield up
        yield restarts


class Metrics(BasePart):
    """``GET /metrics``."""

    name = "metrics"

    def __init__(self, status: Callable[[], dict[str, Any]], commands: Commands, outbox: Outbox):
        events = EventCounts()
        outbox.add_listener(events.hear)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(status, commands, events))

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/metrics", self._metrics)]

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
