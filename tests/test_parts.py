"""Parts are supervised like devices: one that cannot start, or crashes while running, is logged, reported (status,
/healthz, a gateway.part_failed event) and restarted with backoff, while till sales keep flowing to head office.
Parts are installed only when the config asks for them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from aiohttp import ClientSession, web
from paho.mqtt.enums import CallbackAPIVersion

from storelink.app import Core, standard_parts
from storelink.config import parse_config
from storelink.downlink import Downlink
from storelink.drivers.sim.till import TillSimulator, make_sale
from storelink.parts import BasePart, Part, Subscription
from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, wait_for, write_config
from tests.till_fixtures import STORE, gateway_config, running, until


def _till_table(port: int) -> str:
    return f'[[devices]]\nid = "till-1"\ndriver = "till_tcp"\nlisten = "127.0.0.1:{port}"\ntill_id = "1"\n'


async def _sell(port: int, sim: TillSimulator | None = None) -> dict[str, Any]:
    """One real till_tcp sale; returns the gateway's OK (it is durable in the outbox by then)."""
    till = sim or TillSimulator("127.0.0.1", port, "1")
    try:
        if till.hello_reply is None:
            for _ in range(100):
                try:
                    await till.connect()
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.05)
        sale = make_sale("1")
        reply = await till.sale(sale)
        assert reply["type"] == "OK", reply
        return {"sale_id": sale["sale_id"], **reply}
    finally:
        if sim is None:
            await till.close()


def _events(sub: Subscriber, kind: str) -> list[dict[str, Any]]:
    return [e for e in sub.events(STORE) if e["kind"] == kind]


def test_a_part_that_cannot_start_is_reported_and_retried_while_sales_flow(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    till_port, http_port = free_port(), free_port()
    cfg = write_config(tmp_path / "storelink.toml", STORE, mosquitto.port, http_port,
                       "[cart]\nenabled = true\n" + _till_table(till_port))
    (tmp_path / "kiosk").write_text("not a directory")  # where the kiosk sessions keep their journal
    gw = GatewayProcess(cfg, http_port).start()
    try:
        gw.wait_online(15)

        def kiosk() -> dict[str, Any]:
            return gw.get("/api/v1/status")[1]["parts"]["kiosk"]  # type: ignore[no-any-return]

        wait_for(lambda: kiosk()["state"] == "failed", 10, what="the kiosk part to fail")
        assert kiosk()["last_error"].startswith("FileExistsError: ") and "kiosk" in kiosk()["last_error"]
        code, health = gw.get("/healthz")
        assert code == 503 and any(p.startswith("part kiosk failed: ") for p in health["problems"]), health
        wait_for(lambda: gw.get("/api/v1/status")[1]["parts"]["prices"]["state"] == "running", 10,
                 what="the other parts running")
        failed = wait_for(lambda: _events(subscriber, "gateway.part_failed"), 10, what="gateway.part_failed")
        assert failed[0]["device"] == "gateway" and failed[0]["data"]["part"] == "kiosk"
        assert failed[0]["data"]["error"] and failed[0]["data"]["restarts"] >= 1

        acked = asyncio.run(_sell(till_port))  # the tills are not held up by a broken part
        wait_for(lambda: [e for e in _events(subscriber, "sale") if e["data"]["sale_id"] == acked["sale_id"]],
                 10, what="the sale at head office")

        (tmp_path / "kiosk").unlink()  # the operator fixes the disk: the next attempt starts the part
        wait_for(lambda: kiosk()["state"] == "running", 15, what="the kiosk part to start")
        assert kiosk()["restarts"] >= 1 and gw.get("/healthz")[0] == 200
        recovered = wait_for(lambda: _events(subscriber, "gateway.part_recovered"), 10, what="part_recovered")
        assert recovered[0]["data"]["part"] == "kiosk"
        assert gw.terminate() == 0
    finally:
        gw.stop()


class FlakyPart(BasePart):
    """A part with a route and a subscription that crashes once, a while after it started."""

    name = "flaky"

    def __init__(self, topic: str):
        self.topic = topic
        self.runs = 0
        self.crash = asyncio.Event()
        self.handled: list[bytes] = []

    def routes(self) -> list[web.RouteDef]:
        async def hello(_request: web.Request) -> web.Response:
            return web.json_response({"runs": self.runs})

        return [web.get("/api/v1/flaky", hello)]

    def subscriptions(self) -> Sequence[Subscription]:
        async def handle(down: Downlink) -> None:
            self.handled.append(down.payload)

        return [Subscription(self.topic, handle)]

    async def run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            await self.crash.wait()
            raise RuntimeError("lost its database")
        await super().run()

    def status(self) -> dict[str, Any]:
        return {"runs": self.runs}


async def test_a_part_that_crashes_while_running_is_restarted_and_misses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    till_port = free_port()
    cfg = gateway_config(tmp_path, mosquitto.port, [{"id": "till-1", "driver": "till_tcp",
                                                     "listen": f"127.0.0.1:{till_port}", "till_id": "1"}])
    flaky = FlakyPart(f"storelink/{STORE}/flaky")

    def parts(core: Core) -> list[Part]:
        return [*standard_parts(core), flaky]

    hq = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hq-flaky", protocol=mqtt.MQTTv5)
    hq.connect("127.0.0.1", mosquitto.port)
    hq.loop_start()
    try:
        async with running(cfg, parts) as gw, ClientSession() as http:
            url = "http://{}:{}/api/v1/flaky".format(*gw.http.bound)  # type: ignore[str-format]
            await until(lambda: gw.uplink.status()["subscribed"], what="subscribed")
            async with http.get(url) as resp:
                assert resp.status == 200 and (await resp.json()) == {"runs": 1}
            sim = TillSimulator("127.0.0.1", till_port, "1")
            first = await _sell(till_port, sim)

            flaky.crash.set()
            await until(lambda: gw.status()["parts"]["flaky"]["state"] == "failed", what="the crash")
            status = gw.status()["parts"]["flaky"]
            assert status["last_error"] == "RuntimeError: lost its database" and status["restarts"] == 1
            assert any(p == "part flaky failed: RuntimeError: lost its database" for p in gw.health_problems())
            async with http.get(url) as resp:  # its routes say so while it is down
                assert resp.status == 503 and "flaky part is failed" in (await resp.json())["error"]
            hq.publish(flaky.topic, b"while it was down", qos=1)
            during = await _sell(till_port, sim)  # sales flow while the part is down

            await until(lambda: gw.status()["parts"]["flaky"]["state"] == "running", 10, what="the restart")
            await until(lambda: flaky.handled == [b"while it was down"], what="the message kept for it")
            assert flaky.runs == 2 and gw.status()["flaky"] == {"runs": 2} and not gw.health_problems()
            async with http.get(url) as resp:
                assert resp.status == 200
            await until(lambda: {e["data"]["sale_id"] for e in _events(subscriber, "sale")}
                        >= {first["sale_id"], during["sale_id"]}, what="both sales at head office")
            failed = await until(lambda: _events(subscriber, "gateway.part_failed"), what="part_failed")
            assert failed[0]["data"] == {"part": "flaky", "error": "RuntimeError: lost its database",
                                         "restarts": 1, "retry_in_s": 1.0}
            await until(lambda: _events(subscriber, "gateway.part_recovered"), what="part_recovered")
            await sim.close()
    finally:
        hq.loop_stop()
        hq.disconnect()


def test_kiosk_and_cart_are_installed_only_when_the_config_asks(tmp_path: Path) -> None:
    def names(extra: dict[str, Any]) -> list[str]:
        base: dict[str, Any] = {"store_id": STORE, "storage": {"path": str(tmp_path / "gw.db")}}
        from storelink.app import Gateway

        return [p.name for p in Gateway(parse_config({**base, **extra}, "<test>")).parts.parts]

    core = ["prices", "config", "commands", "update", "status_page", "metrics"]
    assert names({"devices": [{"id": "till-1", "driver": "till_tcp"}]}) == core
    assert names({"cart": {"enabled": False}}) == core
    mat = {"id": "mat-1", "driver": "kiosk_mat", "pin": 17}
    with_kiosk = [*core[:4], "kiosk", "cart", *core[4:]]
    assert names({"devices": [mat]}) == with_kiosk
    assert names({"devices": [mat], "cart": {"enabled": False}}) == [*core[:4], "kiosk", *core[4:]]
    assert names({"cart": {"timeout": 3}}) == with_kiosk
    assert json.dumps(names({})) == json.dumps(core)


async def test_open_live_streams_do_not_hold_up_a_stop(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The status page's and the kiosk screen's server-sent events end when the gateway stops (the SSE helper
    never swallows the cancellation; the parts end their streams when they stop)."""
    cfg = {**gateway_config(tmp_path, mosquitto.port, []), "cart": {"enabled": True}}
    async with ClientSession() as http:
        async with running(cfg) as gw:
            base = "http://{}:{}".format(*gw.http.bound)  # type: ignore[str-format]
            streams = [await http.get(base + path) for path in ("/api/v1/stream", "/api/v1/kiosk/kiosk-1/events")]
            assert [(await s.content.readline()).strip() for s in streams] == [b"event: status", b"event: session"]
            stopping = asyncio.get_running_loop().time()
        assert asyncio.get_running_loop().time() - stopping < 2.5  # aiohttp alone would wait 60 s per stream
        for s in streams:
            assert await s.content.read() is not None  # the server ended the response
            s.close()
