"""The kiosk's online cart with a real broker, a real head-office responder, the real kiosk mat driver on a
MockFactory pin and the real escpos_printer driver writing to a file: fetched, printed as an order slip, and
purged (with the kiosk screen told to clear) when the customer steps off."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from storelink.drivers.base import Health
from tests import contract_check
from tests.helpers import Mosquitto, Subscriber
from tests.input_helpers import STORE, base_config, running_gateway, until

CUSTOMER = "signin-TOKEN-8d1f"
CART = {"ok": True, "currency": "EUR", "customer_name": "Alice Example", "items": [
    {"sku": "4006381333931", "description": "Garden hose 20m", "qty": 1, "price": 2499},
    {"sku": "SKU-77", "description": "Hose reel", "qty": 2, "price": 1999},
]}


class HeadOfficeCarts:
    """Answers cart requests like head office: by customer token, over MQTT 5 request/response."""

    def __init__(self, port: int):
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hq-carts", protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.client.on_connect = lambda c, *_a: c.subscribe("storelink/+/cart/request", 1)
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.on_message = self._on_request
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_request(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        contract_check.check_cart_request(msg.topic, bytes(msg.payload))
        req = json.loads(msg.payload)
        self.requests.append(req)
        if req["customer"] == "silent":
            return
        answer = CART if req["customer"] == CUSTOMER else {"ok": False, "error": "unknown customer"}
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = msg.properties.CorrelationData  # type: ignore[union-attr]
        topic = msg.properties.ResponseTopic  # type: ignore[union-attr]

        def send() -> None:
            time.sleep(self.delay)
            client.publish(topic, json.dumps(answer), qos=1, properties=props)

        threading.Thread(target=send, daemon=True).start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def mock_pins() -> Iterator[MockFactory]:
    previous = Device.pin_factory
    factory = MockFactory()
    Device.pin_factory = factory
    yield factory
    factory.reset()
    Device.pin_factory = previous


async def test_cart_fetched_printed_and_purged_on_step_off(tmp_path: Path, mosquitto: Mosquitto,
                                                           subscriber: Subscriber, mock_pins: MockFactory) -> None:
    pin = mock_pins.pin(17)
    slip = tmp_path / "printer.bin"
    slip.touch()
    cfg = base_config(tmp_path, mosquitto.port, [
        {"id": "mat-1", "driver": "kiosk_mat", "pin": 17, "kiosk_id": "kiosk-1", "debounce_s": 0.02,
         "leave_after_s": 0.3},
        {"id": "receipt-1", "driver": "escpos_printer", "connection": "file", "device_file": str(slip)},
    ])
    cfg["cart"] = {"printer": "receipt-1", "timeout": 1.5}
    hq = HeadOfficeCarts(mosquitto.port)
    screen: list[str] = []
    try:
        async with running_gateway(cfg) as gw, aiohttp.ClientSession() as http:
            base = "http://{}:{}/api/v1/kiosk/kiosk-1".format(*gw.http.bound)  # type: ignore[str-format]
            await until(lambda: gw.uplink.connected and gw.supervisor.devices["receipt-1"].state == Health.OK,
                        what="connected, printer ok")

            async def watch_screen() -> None:
                async with http.get(base + "/events") as resp:
                    async for line in resp.content:
                        if line.startswith(b"event: "):
                            screen.append(line[7:].strip().decode())

            watcher = asyncio.create_task(watch_screen())
            async with http.post(base + "/cart", json={"customer": CUSTOMER}) as r:
                assert r.status == 409 and "step on the mat" in (await r.json())["error"]

            pin.drive_low()  # a customer steps on
            await until(lambda: gw.kiosk.active("kiosk-1"), what="session")
            async with http.post(base + "/cart", json={"customer": "nobody"}) as r:
                assert r.status == 404 and (await r.json())["error"] == "unknown customer"
            async with http.post(base + "/cart", json={"customer": CUSTOMER, "list": "cart"}) as r:
                body = await r.json()
                assert r.status == 200, body
            assert [i["sku"] for i in body["items"]] == ["4006381333931", "SKU-77"]
            assert "customer_name" not in json.dumps(gw.kiosk.get("kiosk-1", "online_cart"))
            async with http.post(base + "/cart", json={"customer": "silent"}) as r:
                assert r.status == 504 and "did not answer" in (await r.json())["error"]
            async with http.post(base + "/cart", json={"list": "basket"}) as r:
                assert r.status == 422

            async with http.post(base + "/print") as r:
                printed = await r.json()
                assert r.status == 200, printed
            data = slip.read_bytes()
            assert b"Garden hose 20m" in data and b"2 x Hose reel" in data
            assert f"ORDER {printed['pick']}".encode() in data
            assert b"Alice" not in data and b"\x1dV" in data  # no customer name on the slip; cut at the end

            # The customer walks away while an answer is still on its way: it is dropped, not kept.
            hq.delay = 0.6
            pending = asyncio.create_task(http.post(base + "/cart", json={"customer": CUSTOMER}))
            await until(lambda: len(hq.requests) == 4, what="fourth request")
            pin.drive_high()
            await until(lambda: not gw.kiosk.active("kiosk-1"), 5, what="session ended")
            async with await pending as r:
                assert r.status == 409 and "left" in (await r.json())["error"]
            await asyncio.sleep(0.8)  # the late answer arrives and finds nobody
            await until(lambda: "clear" in screen, what="the kiosk told to clear its screen")
            assert gw.kiosk.get("kiosk-1", "online_cart") is None
            async with http.post(base + "/print") as r:
                assert r.status == 409

            # Offline: a clear answer at once, not a hang.
            pin.drive_low()
            await until(lambda: gw.kiosk.active("kiosk-1"), what="second session")
            mosquitto.stop()
            await until(lambda: not gw.uplink.connected, what="offline")
            started = time.monotonic()
            async with http.post(base + "/cart", json={"customer": CUSTOMER}) as r:
                assert r.status == 503 and "cannot be reached" in (await r.json())["error"]
            assert time.monotonic() - started < 1.0
            mosquitto.start()
            await until(lambda: gw.uplink.connected and gw.uplink.caught_up(), 15, what="back online, caught up")
            watcher.cancel()
        assert screen[:3] == ["session", "session", "clear"]
        # Head office hears only anonymous kiosk events; nothing of the cart or the customer in any event.
        events = subscriber.events(STORE)
        kinds = {e["kind"] for e in events}
        assert {"kiosk.session_started", "kiosk.session_ended"} <= kinds
        assert not any(k.startswith(("cart", "kiosk.cart")) for k in kinds)
        everything = json.dumps(events)
        assert CUSTOMER not in everything and "Garden hose" not in everything and "Alice" not in everything
    finally:
        hq.close()
