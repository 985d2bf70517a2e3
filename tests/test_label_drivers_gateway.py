"""The three label/receipt drivers inside a real gateway (entry points, config validation, supervisor, state
beside the gateway's database) reporting to a real Mosquitto, with their fake peers on loopback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from storelink.app import Gateway
from storelink.config import ConfigError, parse_config
from storelink.drivers.escpos_printer import EscposPrinter
from storelink.drivers.openepaperlink import OpenEPaperLink
from storelink.drivers.sim.escpos_printer import FakeEscposPrinter
from storelink.drivers.sim.openepaperlink import FakeAccessPoint
from storelink.drivers.sim.zpl_printer import FakeZplPrinter
from storelink.drivers.zpl_printer import ZplPrinter
from tests.helpers import Mosquitto, Subscriber, free_port
from tests.label_harness import Change, Item, until, until_async

STORE = "store-0042"


def config(tmp_path: Path, broker: int, zpl: int, ap: str, escpos: int) -> dict[str, object]:
    return {
        "store_id": STORE,
        "mqtt": {"host": "127.0.0.1", "port": broker, "reconnect_min": 0.2, "reconnect_max": 0.5},
        "storage": {"path": str(tmp_path / "gw.db"), "synchronous": "NORMAL"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "devices": [
            {"id": "labels-1", "driver": "zpl_printer", "host": "127.0.0.1", "port": zpl, "poll_interval": 0.5,
             "retry_interval": 0.2, "confirm_interval": 0.05, "layout": {"dpi": 300, "width_mm": 50}},
            {"id": "esl-ap", "driver": "openepaperlink", "url": ap, "poll_interval": 0.2,
             "tags": {"1001": "0B57A1B2C3D4"}},
            {"id": "slips-1", "driver": "escpos_printer", "host": "127.0.0.1", "port": escpos,
             "status_interval": 0.5},
        ],
    }


async def test_drivers_run_under_the_supervisor_and_report(tmp_path: Path, mosquitto: Mosquitto,
                                                           subscriber: Subscriber) -> None:
    zpl = await FakeZplPrinter().start()
    ap = await FakeAccessPoint(["00000B57A1B2C3D4"], checkin_delay=0.2).start()
    escpos = await FakeEscposPrinter().start()
    gw = Gateway(parse_config(config(tmp_path, mosquitto.port, zpl.port, ap.url, escpos.port), "<test>"))
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    try:
        await until(lambda: all(d["state"] == "ok" for d in gw.supervisor.status()), 20, "all devices ok")
        printer, esl, slips = (gw.supervisor.driver(d) for d in ("labels-1", "esl-ap", "slips-1"))
        assert isinstance(printer, ZplPrinter) and isinstance(esl, OpenEPaperLink)
        assert isinstance(slips, EscposPrinter) and printer.price_role == esl.price_role == "label"
        change = Change(4, [Item("1001", "4006381333931", 249, "Organic whole milk 1 l", 249, "l")])
        await printer.price_prepare(change)
        await esl.price_prepare(change)
        await until_async(lambda: printer.price_confirmed(4), 20, "label printed")
        await until_async(lambda: esl.price_confirmed(4), 20, "tag confirmed")
        await slips.print_slip("ORDER 7", [("Total", "EUR 2.49")], None, "Thanks")
        assert (tmp_path / "zpl-labels-1.db").exists() and (tmp_path / "esl-esl-ap.db").exists()
        assert b"^PW591" in zpl.core.printed[0]  # layout from the config table

        def reported(kind_event: tuple[str, str]) -> bool:
            return any(e.get("kind") == kind_event[0] and e.get("data", {}).get("event") == kind_event[1]
                       for e in subscriber.events(STORE))

        for expected in (("label", "printed"), ("label", "esl_confirmed"), ("device", "slip_printed")):
            await until(lambda e=expected: reported(e), 20, f"{expected} event at head office")  # type: ignore[misc]

        # a printer that goes silent shows up as offline in the retained device state
        zpl.core.silent = True
        topic = f"storelink/{STORE}/devices/labels-1/state"

        def last_state() -> dict[str, object] | None:
            states = [json.loads(p) for t, p, _r in subscriber.messages if t == topic and p]
            return states[-1] if states else None

        await until(lambda: (last_state() or {}).get("state") == "offline", 20, "offline state published")
        assert "silent" in str((last_state() or {}).get("last_error"))
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await zpl.stop()
        await ap.close()
        await escpos.stop()


def test_a_wrong_key_names_the_device(tmp_path: Path) -> None:
    cfg = config(tmp_path, 1883, 9100, "http://127.0.0.1:1", 9100)
    cfg["devices"][0]["dpii"] = 300  # type: ignore[index]
    cfg["devices"][1]["tags"] = {"1001": "not-a-mac"}  # type: ignore[index]
    with pytest.raises(ConfigError) as err:
        parse_config(cfg, "<test>")
    text = err.value.render()
    assert "labels-1" in text and "dpii" in text and "esl-ap" in text and "not a tag MAC" in text


async def test_demo_devices_take_a_price_change(tmp_path: Path, mosquitto: Mosquitto) -> None:
    from storelink.drivers.sim import labels_demo

    cfg: dict[str, object] = {"store_id": "store-demo", "storage": {"path": str(tmp_path / "gw.db")},
                              "mqtt": {"port": mosquitto.port}, "http": {"listen": f"127.0.0.1:{free_port()}"}}
    labels_demo.prepare(cfg, tmp_path)
    zpl, ap, _escpos = labels_demo.peers()
    ap.checkin_delay = 0.2
    gw = Gateway(parse_config(cfg, "<demo>"))
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    peers = asyncio.create_task(labels_demo.run(gw))
    try:
        await until(lambda: all(d["state"] == "ok" for d in gw.supervisor.status()), 20, "demo devices ok")
        change = Change(2, [Item("1001", "4006381333931", 179, "Organic whole milk 1 l", 179, "l"),
                            Item("1004", None, 1299, "Olive oil 0.75 l", 1732, "l")])
        targets = [gw.supervisor.driver("labels-1"), gw.supervisor.driver("esl-ap")]
        for t in targets:
            await t.price_prepare(change)  # type: ignore[union-attr]
        for t in targets:
            await until_async(lambda t=t: t.price_confirmed(2), 20, "demo label confirmed")  # type: ignore[misc]
        await until(lambda: ["Olive oil 0.75 l", "€12.99"] in [f[:2] for f in zpl.core.printed_fields()], 5,
                    "the demo printer's label")
    finally:
        peers.cancel()
        stop.set()
        await asyncio.wait_for(task, 30)
