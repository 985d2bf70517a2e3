"""Uplink.reconfigure(): switch brokers live (remote config) without losing an accepted event."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from storelink.app import Gateway
from storelink.config import MqttConfig, parse_config
from tests.helpers import Mosquitto, Subscriber, free_port

STORE = "store-0042"


def _cfg(tmp_path: Path, port: int) -> dict[str, object]:
    return {
        "store_id": STORE,
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min": 0.2, "reconnect_max": 0.5},
        "storage": {"path": str(tmp_path / "gw.db")},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
    }


async def _until(cond: object, what: str, limit_s: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_switch_broker_live_loses_nothing(tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    (tmp_path / "b").mkdir()
    broker_b = Mosquitto(tmp_path / "b").start()
    sub_b = Subscriber(broker_b.port)
    gw = Gateway(parse_config(_cfg(tmp_path, mosquitto.port)))
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    try:
        await _until(lambda: gw.uplink.connected, "first connect")
        first = [await gw.emit("test.before", "dev1", {"i": i}) for i in range(200)]
        # Switch while events are still in flight, then keep emitting during the reconnect.
        mqtt_b = MqttConfig.model_validate({**gw.config.mqtt.model_dump(), "port": broker_b.port})
        await gw.uplink.reconfigure(mqtt_b)
        second = [await gw.emit("test.after", "dev1", {"i": i}) for i in range(50)]
        await _until(lambda: gw.uplink.connected and gw.uplink.caught_up(), "delivery through broker B")
        seen = {e["seq"] for e in subscriber.events(STORE)} | {e["seq"] for e in sub_b.events(STORE)}
        assert {a.seq for a in first + second} <= seen
        assert {a.seq for a in second} <= {e["seq"] for e in sub_b.events(STORE)}
        assert gw.uplink.status()["broker"] == f"127.0.0.1:{broker_b.port}"
        # Head office watching the old broker sees this store go offline there, not a stale "online".
        statuses = [json.loads(p) for t, p, _r in subscriber.messages if t == f"storelink/{STORE}/status"]
        assert statuses[-1]["state"] == "offline"

        # A dead broker: the uplink says so; switching back recovers.
        dead = MqttConfig.model_validate({**gw.config.mqtt.model_dump(), "port": free_port()})
        await gw.uplink.reconfigure(dead)
        await _until(lambda: "connection refused by 127.0.0.1" in (gw.uplink.last_error or ""), "a dead-broker error")
        assert gw.uplink.status()["problem"] == "refused"
        assert not gw.uplink.connected
        await gw.uplink.reconfigure(gw.config.mqtt)
        await _until(lambda: gw.uplink.connected, "reconnect to broker A")

        with pytest.raises(ValueError, match="topic_prefix"):
            await gw.uplink.reconfigure(MqttConfig.model_validate({**gw.config.mqtt.model_dump(),
                                                                  "topic_prefix": "other"}))
    finally:
        stop.set()
        await task
        sub_b.close()
        broker_b.stop()
