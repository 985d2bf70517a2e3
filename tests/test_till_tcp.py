"""The till_tcp driver against the till simulator over real sockets, with a real outbox and a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from storelink.app import Gateway
from storelink.drivers.base import PrepareFailed
from storelink.drivers.sim.till import TillError, TillSimulator, make_sale
from storelink.drivers.till_listener import TillRejected
from storelink.drivers.till_tcp import TillTcpDriver
from tests.helpers import Mosquitto, Subscriber, free_port
from tests.till_fixtures import STORE, Change, FakeBook, Item, device_status, gateway_config, running, until


def _till(port: int, dev: str = "till-1", till_id: str = "1", **extra: Any) -> dict[str, Any]:
    return {"id": dev, "driver": "till_tcp", "listen": f"127.0.0.1:{port}", "till_id": till_id,
            "request_timeout": 1.0, **extra}


def _driver(gw: Gateway, dev: str = "till-1") -> TillTcpDriver:
    drv = gw.supervisor.driver(dev)
    assert isinstance(drv, TillTcpDriver)
    return drv


async def _connected(gw: Gateway, port: int, till_id: str = "1", dev: str = "till-1",
                     **kw: Any) -> TillSimulator:
    await until(lambda: gw.supervisor.driver(dev) is not None, what="the driver")
    sim = TillSimulator("127.0.0.1", port, till_id, **kw)
    for _ in range(50):  # the listener opens when the driver starts
        try:
            await sim.connect()
            break
        except ConnectionRefusedError:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("till port never opened")
    await until(lambda: device_status(gw, dev)["state"] == "ok", what=f"{dev} to be ok")
    return sim


async def test_sale_is_acknowledged_once_durable_and_reaches_head_office(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    port = free_port()
    async with running(gateway_config(tmp_path, mosquitto.port, [_till(port)])) as gw:
        sim = await _connected(gw, port)
        assert sim.hello_reply is not None and sim.hello_reply["device"] == "till-1"
        sale = make_sale("1", price_version=3)
        reply = await sim.sale(sale)
        assert reply["type"] == "OK" and reply["seq"] >= 1 and reply["event_id"]
        assert gw.outbox.last_seq >= reply["seq"]  # acknowledged => in the outbox
        events = await until(lambda: [e for e in subscriber.events(STORE) if e["kind"] == "sale"], what="the sale")
        assert events[0]["id"] == reply["event_id"] and events[0]["device"] == "till-1"
        assert events[0]["data"]["sale_id"] == sale["sale_id"] and events[0]["data"]["till_id"] == "1"
        assert events[0]["data"]["lines"] == sale["lines"]
        status = device_status(gw, "till-1")
        assert status["last_seen"] and status["details"]["sales"] == 1 and status["details"]["peer"]
        await sim.close()


async def test_lookup_answers_from_the_price_book_or_says_there_is_none(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    async with running(gateway_config(tmp_path, mosquitto.port, [_till(port)])) as gw:
        sim = await _connected(gw, port)
        gw.device_services.prices = None  # a gateway without a price book
        reply = await sim.lookup("4006381333931")
        assert (reply["type"], reply["code"], reply["error"]) == ("ERROR", "no_price_book", "no price book")

        class Book(FakeBook):
            async def alookup(self, sku: str) -> dict[str, Any] | None:
                return {"sku": sku, "price": 249, "version": 4} if sku == "4006381333931" else None

        gw.device_services.prices = Book()
        reply = await sim.lookup("4006381333931")
        assert reply["type"] == "OK" and reply["item"] == {"sku": "4006381333931", "price": 249, "version": 4}
        assert (await sim.lookup("nope"))["code"] == "not_found"
        assert (await sim.request({"type": "LOOKUP", "sku": 12}, raise_error=False))["code"] == "bad_request"
        await sim.close()


async def test_a_till_behind_the_book_is_told_stale_and_its_sales_are_flagged(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    class Book(FakeBook):  # the store runs version 5; the audit has not looked at this till yet
        active_version = 5

        async def alookup(self, sku: str) -> dict[str, Any]:
            return {"sku": sku, "price": 249, "version": 5}

    port = free_port()
    async with running(gateway_config(tmp_path, mosquitto.port, [_till(port)])) as gw:
        gw.device_services.prices = Book()
        sim = await _connected(gw, port, version=3)  # it was switched off during version 4 and 5
        assert sim.hello_reply is not None and sim.hello_reply["stale"] is True
        assert (await sim.lookup("1001"))["stale"] is True
        stale_sale = make_sale("1", price_version=3)
        await sim.sale(stale_sale)
        await sim.request({"type": "HELLO", "till_id": "1", "version": 5})  # brought up to date
        assert (await sim.lookup("1001"))["stale"] is False
        fresh_sale = make_sale("1", price_version=5)
        await sim.sale(fresh_sale)
        sales = await until(lambda: len(s := [e for e in subscriber.events(STORE) if e["kind"] == "sale"]) == 2 and s,
                            what="both sales")
        flags = {e["data"]["sale_id"]: e["data"].get("stale_prices") for e in sales}
        assert flags == {stale_sale["sale_id"]: True, fresh_sale["sale_id"]: None}
        await sim.close()


async def test_price_change_is_staged_in_parts_then_committed_or_aborted(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    async with running(gateway_config(tmp_path, mosquitto.port, [_till(port)])) as gw:
        sim = await _connected(gw, port)
        drv = _driver(gw)
        items = [Item(f"sku-{i}", 100 + i) for i in range(1200)]
        await drv.price_prepare(Change(7, items))
        assert [m["part"] for m in sim.received if m["type"] == "PREPARE"] == [1, 2, 3]
        assert len(sim.staged[7]) == 1200 and sim.version is None
        assert not await drv.price_confirmed(7)
        await drv.price_commit(7)
        await drv.price_commit(7)  # re-driven after a crash: idempotent
        assert sim.version == 7 and sim.prices["sku-5"]["price"] == 105
        assert await drv.price_confirmed(7) and await drv.price_reported_version() == 7
        await drv.price_prepare(Change(8, items[:2]))
        await drv.price_abort(8)
        assert 8 not in sim.staged
        with pytest.raises(TillRejected, match="not_staged"):
            await drv.price_commit(9)
        sim.refuse_prepare = "price book locked by a manager"
        with pytest.raises(PrepareFailed, match=r"refused version 10.*locked"):
            await drv.price_prepare(Change(10, items[:1]))
        await sim.close()


async def test_protocol_2_holds_the_transition_prices_until_final_and_protocol_1_never_sees_them(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    devices = [_till(port), _till(port, "till-2", "2")]
    async with running(gateway_config(tmp_path, mosquitto.port, devices)) as gw:
        new = await _connected(gw, port)  # speaks protocol 2
        old = await _connected(gw, port, "2", "till-2", protocol=1)
        assert new.hello_reply is not None and new.hello_reply["protocol"] == 2
        assert old.hello_reply is not None and old.hello_reply["protocol"] == 1
        drv, legacy = _driver(gw), _driver(gw, "till-2")
        assert drv.price_can_hold is True and legacy.price_can_hold is False
        base = Change(1, [Item("up", 100), Item("down", 100)])
        for d in (drv, legacy):
            await d.price_prepare(base)
            await d.price_commit(1)
        change = Change(2, [Item("up", 150), Item("down", 80)], transition_prices={"up": 100, "down": 80})
        await drv.price_prepare(change)
        prepare = next(m for m in new.received if m["type"] == "PREPARE" and m["version"] == 2)
        assert {i["sku"]: i["transition_price"] for i in prepare["items"]} == {"up": 100, "down": 80}
        assert new.charge("down") == 100  # staged only: nothing charged differently yet
        await drv.price_hold(2)
        assert (new.charge("up"), new.charge("down")) == (100, 80)  # held: at most min(old, new)
        await drv.price_commit(2)
        assert new.version == 2 and (new.charge("up"), new.charge("down")) == (100, 80)
        await drv.price_final(2, ["up"])  # the label of "up" is not known to show 150 yet
        assert (new.charge("up"), new.charge("down")) == (100, 80)
        await drv.price_final(2, [])
        assert (new.charge("up"), new.charge("down")) == (150, 80) and new.holds == {}
        await drv.price_final(2, [])  # repeated after a restart: harmless
        # a protocol-1 till gets the same PREPARE without transition prices, and no HOLD/FINAL exists for it
        await legacy.price_prepare(change)
        prepare = next(m for m in old.received if m["type"] == "PREPARE" and m["version"] == 2)
        assert all("transition_price" not in i for i in prepare["items"]) and "effective_at" not in prepare
        with pytest.raises(TillRejected, match="unknown_type"):
            await legacy.price_hold(2)
        await new.close()
        await old.close()


async def test_silent_till_times_out_and_is_dropped_without_a_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    cfg = gateway_config(tmp_path, mosquitto.port, [_till(port, ping_interval=1)])
    async with running(cfg) as gw:
        sim = await _connected(gw, port, answer_gateway=False)
        drv = _driver(gw)
        with pytest.raises(PrepareFailed, match="did not answer PREPARE within 1 s"):
            await drv.price_prepare(Change(3, [Item("a", 1)]))
        st = device_status(gw, "till-1")
        assert st["state"] == "degraded" and "did not answer PREPARE" in st["last_error"]
        with pytest.raises((TimeoutError, ConnectionError)):  # the PING may hang up first
            await drv.price_commit(3)
        # It stays quiet: the PING after 1 idle second goes unanswered and the gateway hangs up.
        await asyncio.wait_for(sim.closed.wait(), 10)
        await until(lambda: device_status(gw, "till-1")["state"] == "offline", what="offline")
        assert device_status(gw, "till-1")["restarts"] == 0


async def test_garbage_gets_error_replies_and_the_connection_goes_on(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    async with running(gateway_config(tmp_path, mosquitto.port, [_till(port)])) as gw:
        sim = await _connected(gw, port)
        cases: list[tuple[bytes, str, Any]] = [
            (b"this is not json\n", "bad_json", None),
            (b"\xff\xfe\x00garbage\n", "bad_json", None),
            (b"[1, 2, 3]\n", "bad_json", None),
            (b'{"id": 4}\n', "bad_json", None),
            (b'{"type": "FROBNICATE", "id": 5}\n', "unknown_type", 5),
            (b"x" * (1024 * 1024) + b"\n", "line_too_long", None),
            (b'{"type": "SALE", "id": 6, "sale": {"sale_id": "r1", "total": 5, "lines": []}}\n', "bad_request", 6),
        ]
        for raw, code, re in cases:
            await sim.send_raw(raw)
            reply = await sim.next_reply()
            assert (reply["type"], reply["code"], reply["re"]) == ("ERROR", code, re), (raw[:40], reply)
            assert reply["error"]
        assert device_status(gw, "till-1")["state"] == "degraded"
        assert "bad input" in device_status(gw, "till-1")["last_error"]
        sale_reply = await sim.sale(make_sale("1"))  # the same connection still works
        assert sale_reply["type"] == "OK"
        st = device_status(gw, "till-1")
        assert st["state"] == "ok" and st["restarts"] == 0 and st["details"]["bad_input"] == len(cases)
        bad = await sim.request({"type": "SALE", "sale": {**make_sale("1"), "currency": "euro"}}, raise_error=False)
        assert bad["code"] == "bad_request" and "sale.currency" in bad["error"]
        await sim.close()


async def test_disconnect_reconnect_and_a_deferred_abort(tmp_path: Path, mosquitto: Mosquitto) -> None:
    port = free_port()
    async with running(gateway_config(tmp_path, mosquitto.port, [_till(port)])) as gw:
        sim = await _connected(gw, port)
        drv = _driver(gw)
        await drv.price_prepare(Change(5, [Item("a", 100)]))
        await sim.close()
        await until(lambda: device_status(gw, "till-1")["state"] == "offline", what="offline")
        assert device_status(gw, "till-1")["last_error"] == "till disconnected"
        with pytest.raises(PrepareFailed, match="not connected"):
            await drv.price_prepare(Change(6, [Item("a", 90)]))
        await drv.price_abort(5)  # the till is away: sent when it is back
        sim.received.clear()
        await sim.connect()  # HELLO says version 5 is still staged
        await until(lambda: 5 not in sim.staged, what="the deferred ABORT")
        assert [m["type"] for m in sim.received] == ["ABORT"]
        await until(lambda: device_status(gw, "till-1")["state"] == "ok", what="ok again")
        # A till that comes back while its old connection is half-open replaces it.
        second = TillSimulator("127.0.0.1", port, "1")
        await second.connect()
        await asyncio.wait_for(sim.closed.wait(), 5)
        assert (await second.sale(make_sale("1")))["type"] == "OK"
        assert device_status(gw, "till-1")["state"] == "ok"
        await second.close()


async def test_tills_share_one_port_and_unknown_or_unauthorised_ones_are_refused(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    port = free_port()
    secret = "s3cret-s3cret-s3cret"
    devices = [_till(port), _till(port, "till-2", "2", secret=secret)]
    async with running(gateway_config(tmp_path, mosquitto.port, devices)) as gw:
        one = await _connected(gw, port)
        with pytest.raises(TillError, match="unknown_till"):
            await TillSimulator("127.0.0.1", port, "99").connect()
        with pytest.raises(TillError, match="unauthorized"):
            await TillSimulator("127.0.0.1", port, "2", secret="wrong-wrong-wrong-wrong").connect()
        two = await _connected(gw, port, "2", "till-2", secret=secret)
        await one.sale(make_sale("1"))
        await two.sale(make_sale("2"))
        def sales_seen() -> list[dict[str, Any]]:
            return [e for e in subscriber.events(STORE) if e["kind"] == "sale"]

        await until(lambda: len(sales_seen()) >= 2, what="both sales")
        sales = sales_seen()
        assert sorted((e["device"], e["data"]["till_id"]) for e in sales) == [("till-1", "1"), ("till-2", "2")]
        await one.close()
        await two.close()
