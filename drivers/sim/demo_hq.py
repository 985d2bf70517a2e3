"""Head office as `storelink demo` plays it: one MQTT 5 client, like `storelink hq`, on the demo's broker.

It follows everything the store publishes (the story waits on these messages to tell what happened; `--verbose`
prints each one raw), answers the kiosk's online-cart requests, and publishes signed price lists. Its session is
persistent, so what the store sends while the broker is briefly down is not lost to it.

It also writes what a newcomer needs to act as head office from another terminal while the demo runs (the
signing key, a price change, the store's config) and the exact commands to paste (`commands()`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from storelink import safe_json
from storelink.drivers.sim.demo_broker import BrokerError

Message = tuple[str, dict[str, Any]]

# What head office keeps in the demo customer's online cart (answered for any sign-in token).
DEMO_CART = {"ok": True, "currency": "EUR", "items": [
    {"sku": "1004", "description": "Olive oil 750 ml", "qty": 1, "price": 1299},
    {"sku": "1002", "description": "Dark chocolate 100 g", "qty": 2, "price": 299},
]}


class DemoHeadOffice:
    def __init__(self, port: int, store_id: str, key_b64: str, verbose: bool = False,
                 say: Callable[[str], None] = print):
        self.store_id = store_id
        self.key = key_b64
        self.verbose = verbose
        self.say = say
        self.base = f"storelink/{store_id}"
        self._lock = threading.Lock()
        self.messages: list[Message] = []  # every JSON object the store published, in arrival order
        self.subscribed = threading.Event()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-head-office", protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(10):  # blocking: the demo makes head office in a thread
            self.close()
            raise BrokerError(f"head office could not subscribe on the demo's broker 127.0.0.1:{port} within 10 s")

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, _rc: Any, _props: Any = None) -> None:
        client.subscribe(f"{self.base}/#", 1)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self.verbose:
            text = msg.payload.decode(errors="replace")
            self.say(f"[head office] {msg.topic}  {text[:157] + '...' if len(text) > 160 else text}")
        body = safe_json.message_object(msg.payload)
        if body is None:
            return
        with self._lock:
            self.messages.append((msg.topic, body))
        if msg.topic == f"{self.base}/cart/request":
            self._answer_cart(client, msg)

    def _answer_cart(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = getattr(msg.properties, "CorrelationData", None)
        topic = getattr(msg.properties, "ResponseTopic", None) or f"{self.base}/cart/response"
        client.publish(topic, json.dumps(DEMO_CART), qos=1, properties=props)

    # -- what the story reads --------------------------------------------------------------------------------
    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def since(self, index: int) -> list[Message]:
        with self._lock:
            return self.messages[index:]

    def events(self, since: int = 0, kind: str | None = None) -> list[dict[str, Any]]:
        out = []
        for topic, body in self.since(since):
            if topic.startswith(f"{self.base}/events/") and (kind is None or body.get("kind") == kind):
                out.append(body)
        return out

    # -- what head office sends ------------------------------------------------------------------------------
    def publish_prices(self, version: int, rows: list[dict[str, Any]], batch_id: str) -> None:
        """A signed delta price list for this store, and the retained desired version (as hq publish-prices)."""
        from storelink.hq.batch import build_batch

        b = build_batch(rows, version=version, batch_id=batch_id, store=self.store_id, key=self.key, mode="delta")
        for message in b.messages:
            self.client.publish(f"{self.base}/prices/batch", message, qos=1)
        self.client.publish(f"{self.base}/prices/desired", json.dumps({"version": version, "batch_id": batch_id}),
                            qos=1, retain=True)

    def close(self) -> None:
        self.client.disconnect()  # first: paho's network thread ends only once its queue is empty
        self.client.loop_stop()


def write_newcomer_files(workdir: Path, key_b64: str, config: dict[str, Any]) -> dict[str, Path]:
    """The files the printed commands use, in the demo's work directory (it lives as long as the demo):
    the head-office signing key (mode 600), a price change, and the store's config for push-config (without the
    page token: head office leaves local secrets out, the store keeps its own)."""
    import tomli_w

    key = workdir / "hq.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key_b64 + "\n")
    prices = workdir / "price-change.csv"
    prices.write_text("sku,price,gtin,description\n1003,79,4006381333955,Sparkling water 0.5 l\n")
    pushed = {k: v for k, v in config.items() if k != "config_version"}
    pushed["http"] = {k: v for k, v in config["http"].items() if k != "token"}
    store = workdir / f"{config['store_id']}.toml"
    store.write_text("# The demo store's config as head office pushes it: edit something (for example [cart] timeout)\n"
                     "# and push it with the command the demo printed. The store applies it and reports back.\n"
                     + tomli_w.dumps(pushed))
    return {"key": key, "prices": prices, "config": store}


def commands(storelink: str, broker: str, store_id: str, files: dict[str, Path]) -> list[tuple[str, str]]:
    """(what it does, the command line) for a newcomer to paste while the demo runs."""
    at = f"--broker {broker}"
    return [
        ("the fleet table: which store runs which price version", f"{storelink} hq status {at}"),
        ("publish a price change (1003 Sparkling water 0.89 -> 0.79) and follow it until committed",
         f"{storelink} hq publish-prices {files['prices']} --store {store_id} --key {files['key']} --mode delta {at}"),
        ("send a command and print the store's answer", f"{storelink} hq cmd {store_id} ping {at}"),
        ("push a signed config (edit the file first to change something); the store applies it",
         f"{storelink} hq push-config {files['config']} --key {files['key']} {at}"),
    ]

