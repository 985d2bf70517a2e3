"""Helpers for the price tests: a head-office key, batches, a publisher, and a gateway config with targets."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from storelink.hq.batch import Batch, build_batch
from storelink.remote.signing import KeyPair, keygen
from tests.helpers import Subscriber, wait_for

STORE = "store-0042"


def make_key() -> KeyPair:
    return keygen()


def items(n: int, base: int = 100, step: int = 0, prefix: str = "SKU") -> list[dict[str, Any]]:
    return [{"sku": f"{prefix}{i:06d}", "gtin": f"{4000000000000 + i:013d}", "price": base + i * step,
             "description": f"Item {i}"} for i in range(n)]


def batch(key: KeyPair | None, version: int, rows: list[dict[str, Any]], batch_id: str | None = None,
          store: str = STORE, **kw: Any) -> Batch:
    return build_batch(rows, version=version, batch_id=batch_id or f"b{version}", store=store,
                       key=key.private_b64 if key else None, **kw)


class Publisher:
    """Plays head office's publishing side."""

    def __init__(self, port: int):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hq-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payloads: list[bytes], retain: bool = False) -> None:
        infos = [self.client.publish(topic, p, qos=1, retain=retain) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)

    def publish(self, topic: str, payload: bytes, *, response_topic: str | None = None,
                correlation: bytes | None = None, retain: bool = False) -> None:
        """One QoS 1 message, optionally with an MQTT 5 response topic and correlation data."""
        props = None
        if response_topic is not None or correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(10)

    def batch(self, b: Batch, store: str = STORE) -> None:
        self.send(f"storelink/{store}/prices/batch", b.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def prices_config(key: KeyPair, extra: str = "", deadline: float = 20.0) -> str:
    """[trust] and [prices] with short test timings; `key = value` lines in `extra` replace the defaults."""
    import os

    keys = {"prepare_deadline": str(deadline), "commit_retry": "0.3", "confirm_poll": "0.3", "stale_check": "0.5",
            "abort_hold": "1.0", "audit_interval": "3600", "resend_grace": "1"}
    rest: list[str] = []
    for line in extra.splitlines():
        if rest or line.startswith("["):  # the first table header ends the [prices] keys
            rest.append(line)
        elif "=" in line:
            name, value = line.split("=", 1)
            keys[name.strip()] = value.strip()
    debug = '[logging]\nlevel = "DEBUG"\n' if os.environ.get("STORELINK_TEST_DEBUG") else ""
    body = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return f'{debug}[trust]\npublic_keys = ["{key.public_b64}"]\n[prices]\n{body}' + "".join(f"{r}\n" for r in rest)


def price_events(sub: Subscriber, kind: str, store: str = STORE) -> list[dict[str, Any]]:
    return [e for e in sub.events(store) if e["kind"] == kind]


def wait_event(sub: Subscriber, kind: str, timeout: float = 20.0, store: str = STORE, **match: Any) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for e in price_events(sub, kind, store):
            if all(e["data"].get(k) == v for k, v in match.items()):
                return e
        return None

    return wait_for(found, timeout, what=f"{kind} event {match}")  # type: ignore[no-any-return]


def latest_state(sub: Subscriber, store: str = STORE) -> dict[str, Any] | None:
    with sub.lock:
        bodies = [p for t, p, _r in sub.messages if t == f"storelink/{store}/prices/state" and p]
    return json.loads(bodies[-1]) if bodies else None


def write_items_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    cols = ["sku", "gtin", "price", "description"]
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path
