"""A fleet of lightweight simulated stores speaking the store contract (docs/mqtt.md) to one broker.

For head office's tests, bench/fleet.py and anyone sizing an ingest deployment: each simulated store has its own
topics and `seq` counter and publishes what a real gateway does (a retained birth, QoS 1 events with `id`, `seq`,
`ts`, `kind`, `device`, `data`, the retained outbox state), many stores over a few MQTT connections. A store can
be told to skip seqs (events that are really missing, as a broker dropping messages would cause) or to report
evicted ranges (as a real gateway at its cap does).

    python -m storelink.drivers.sim.fleet --broker 127.0.0.1:1883 --stores 500 --events 100
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

VERSION = "0.1.0"
WINDOW = 5000  # our own bound on unacknowledged publishes per connection (paho silently drops past 65,535)


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


@dataclass
class SimStore:
    store_id: str
    groups: list[str] = field(default_factory=list)
    seq: int = 0
    prefix: str = "storelink"
    _ids: Any = field(default_factory=lambda: itertools.count())
    _id_prefix: str = field(default_factory=lambda: os.urandom(10).hex())

    def topic(self, rest: str) -> str:
        return f"{self.prefix}/{self.store_id}/{rest}"

    def event(self, kind: str, data: dict[str, Any], device: str = "sim-1", skip: bool = False) -> tuple[str, bytes]:
        """The next event (topic, payload); `skip` uses up a seq without an event (a real gap)."""
        self.seq += 1
        if skip:
            return "", b""
        body = {"id": f"{self._id_prefix}{next(self._ids):012x}", "seq": self.seq, "ts": iso(time.time()),
                "kind": kind, "device": device, "data": data}
        return self.topic(f"events/{kind}"), json.dumps(body, separators=(",", ":")).encode()

    def birth(self) -> tuple[str, bytes]:
        return self.topic("status"), json.dumps({"state": "online", "store_id": self.store_id, "version": VERSION,
                                                 "started_at": iso(time.time()), "protocol": "5",
                                                 "groups": self.groups}).encode()

    def offline(self) -> tuple[str, bytes]:
        """What the broker publishes as the store's Last Will."""
        return self.topic("status"), json.dumps({"state": "offline", "store_id": self.store_id,
                                                 "groups": self.groups}).encode()

    def prices_state(self, version: int, stale: Iterable[str] = (), drift: int = 0) -> tuple[str, bytes]:
        devices = {"till-1": {"role": "till", "version": version, "state": "current", "batch_state": None,
                              "drift": None}}
        devices |= {d: {"role": "till", "version": version - 1, "state": "stale", "batch_state": None,
                        "drift": None} for d in stale}
        return self.topic("prices/state"), json.dumps({
            "store_id": self.store_id, "active_version": version, "active_batch": f"b{version}", "pending": None,
            "devices": devices, "drift": drift, "updated_at": iso(time.time())}).encode()

    def device_state(self, device: str, state: str = "ok", error: str | None = None) -> tuple[str, bytes]:
        now = iso(time.time())
        return self.topic(f"devices/{device}/state"), json.dumps({
            "device": device, "driver": "till_tcp", "state": state, "last_error": error, "last_seen": now,
            "since": now}).encode()

    def outbox_state(self, depth: int = 0, evicted_total: int = 0) -> tuple[str, bytes]:
        return self.topic("outbox/state"), json.dumps({
            "depth": depth, "bytes": 0, "critical": 0, "oldest_undelivered_at": None, "next_seq": self.seq + 1,
            "evicted_total": evicted_total, "alarms": {}, "ts": iso(time.time())}).encode()


def telemetry(n: int) -> dict[str, Any]:
    return {"cpu": round(random.random(), 3), "temp_c": 40 + n % 20, "n": n}


class Connection:
    """One MQTT connection publishing QoS 1 for many stores, with a bounded window of unacknowledged messages."""

    def __init__(self, host: str, port: int, client_id: str):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self._cond = threading.Condition()
        self._outstanding = 0
        self.acked = 0
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=60)
        self.client.loop_start()

    def _on_publish(self, *_a: Any) -> None:
        with self._cond:
            self._outstanding -= 1
            self.acked += 1
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self._cond:
            while self._outstanding >= WINDOW:
                self._cond.wait(1.0)
            self._outstanding += 1
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")

    def drain(self, timeout: float = 120.0) -> None:
        """Until the broker acknowledged everything published."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._outstanding > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._outstanding} publishes not acknowledged after {timeout:g} s")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Fleet:
    """`stores` simulated stores over `connections` MQTT connections to one broker."""

    def __init__(self, host: str, port: int, stores: Iterable[str], *, connections: int = 2, name: str = "fleet",
                 groups: Iterable[str] = ()):
        group_list = list(groups)
        self.stores = [SimStore(s, [group_list[i % len(group_list)]] if group_list else [])
                       for i, s in enumerate(stores)]
        self.links = [Connection(host, port, f"sim-{name}-{i}-{os.getpid()}") for i in range(max(1, connections))]
        self.published = 0

    def _link(self, i: int) -> Connection:
        return self.links[i % len(self.links)]

    def births(self) -> None:
        for i, s in enumerate(self.stores):
            self._link(i).publish(*s.birth(), retain=True)
        self.drain()

    def burst(self, per_store: int, *, kind: str = "telemetry", skip: dict[str, set[int]] | None = None,
              rate: float | None = None) -> int:
        """per_store events for every store, round-robin over the stores; returns how many were published.
        `skip`: store -> seqs to leave out (really missing). `rate`: events per second for the whole fleet."""
        skip = skip or {}
        sent, start = 0, time.monotonic()
        for n in range(per_store):
            for i, s in enumerate(self.stores):
                topic, payload = s.event(kind, telemetry(n), skip=(s.seq + 1) in skip.get(s.store_id, ()))
                if topic:
                    self._link(i).publish(topic, payload)
                    sent += 1
                if rate and sent % 100 == 0:
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        self.published += sent
        return sent

    def send(self, store: SimStore, topic: str, payload: bytes, retain: bool = False) -> None:
        self._link(self.stores.index(store)).publish(topic, payload, retain=retain)

    def drain(self, timeout: float = 120.0) -> None:
        for link in self.links:
            link.drain(timeout)

    def close(self) -> None:
        for link in self.links:
            link.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", default="127.0.0.1:1883")
    p.add_argument("--stores", type=int, default=100)
    p.add_argument("--events", type=int, default=100, help="events per store")
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--rate", type=float, default=0, help="events per second for the whole fleet (0: as fast)")
    args = p.parse_args()
    host, _, port = args.broker.rpartition(":")
    fleet = Fleet(host, int(port), [f"sim-{i:05d}" for i in range(args.stores)], connections=args.connections)
    fleet.births()
    start = time.monotonic()
    sent = fleet.burst(args.events, rate=args.rate or None)
    fleet.drain()
    took = time.monotonic() - start
    print(f"{sent} events from {args.stores} stores in {took:.1f} s ({sent / took:.0f}/s)")
    fleet.close()


if __name__ == "__main__":
    main()
