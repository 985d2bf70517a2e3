"""A retailer's driver, installed as its own distribution with an entry point in `storelink.drivers`, runs in a
real `storelink run` and gets the same typed DeviceContext as StoreLink's drivers (and nothing of the gateway)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.helpers import STORELINK, GatewayProcess, Mosquitto, Subscriber, free_port, wait_for, write_config

STORE = "store-0042"

MODULE = '''
import asyncio

from storelink.drivers.base import DeviceConfig, Driver, Health


class ProbeConfig(DeviceConfig):
    greeting: str = "hello"


class Probe(Driver):
    config_model = ProbeConfig

    async def run(self) -> None:
        ctx = self.ctx
        ctx.set_health(Health.OK)
        book = ctx.prices
        await ctx.emit("probe.context", {
            "greeting": self.config.greeting, "store": ctx.store_id, "device": ctx.device_id,
            "data_dir": str(ctx.data_dir), "sync": ctx.storage_sync,
            "price_version": None if book is None else book.active_version,
            "kiosk": ctx.kiosk is not None,
            "fields": sorted(n for n in dir(ctx) if not n.startswith("_") and n not in ("config", "driver")),
        })
        await asyncio.get_running_loop().create_future()


class HalfTill(Probe):
    """Says it charges prices but implements only part of PriceTarget."""

    price_role = "till"

    async def price_prepare(self, change) -> None:
        pass

    def price_commit(self, version):  # not a coroutine
        pass
'''


def _install(tmp_path: Path) -> dict[str, str]:
    """The retailer's distribution, on the gateway's path: a module and its dist-info with the entry points."""
    site = tmp_path / "site"
    dist = site / "acme_probe-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "acme_probe.py").write_text(MODULE)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-probe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[storelink.drivers]\nacme_probe = acme_probe:Probe\n"
                                           "acme_half_till = acme_probe:HalfTill\n")
    return {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_a_retailers_driver_gets_the_typed_context(tmp_path: Path, mosquitto: Mosquitto,
                                                   subscriber: Subscriber) -> None:
    env = _install(tmp_path)
    http = free_port()
    cfg = write_config(tmp_path / "storelink.toml", STORE, mosquitto.port, http,
                       '[[devices]]\nid = "probe-1"\ndriver = "acme_probe"\ngreeting = "hej"\n')
    gw = GatewayProcess(cfg, http, env=env)
    gw.start()
    try:
        events = wait_for(lambda: [e for e in subscriber.events(STORE) if e["kind"] == "probe.context"], 15,
                          what="the probe's event")
        data = events[0]["data"]
        assert {k: data[k] for k in ("greeting", "store", "device", "data_dir", "sync", "price_version",
                                     "kiosk")} == {
            "greeting": "hej", "store": STORE, "device": "probe-1", "data_dir": str(tmp_path), "sync": "FULL",
            "price_version": 0, "kiosk": False}
        # What the context offers, and no door to the gateway (no service locator, no gateway object).
        assert {"emit", "set_health", "seen", "watch_thread", "unwatch_thread", "prices", "kiosk", "data_dir",
                "storage_sync", "store_id", "device_id"} <= set(data["fields"])
        assert not {"service", "gateway", "services"} & set(data["fields"])
        device = next(d for d in gw.get("/api/v1/status")[1]["devices"] if d["device"] == "probe-1")
        assert device["driver"] == "acme_probe" and device["state"] == "ok"
    finally:
        gw.stop()


def test_a_price_target_is_checked_against_the_protocol_when_loaded(tmp_path: Path) -> None:
    env = {**os.environ, **_install(tmp_path)}
    cfg = write_config(tmp_path / "storelink.toml", STORE, 1883, 8080,
                       '[[devices]]\nid = "till-9"\ndriver = "acme_half_till"\n')
    res = subprocess.run([STORELINK, "check-config", str(cfg)], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1, res
    assert ("devices[0] (id='till-9').driver: driver 'acme_half_till' declares price_role 'till' but has no async "
            "price_commit, price_abort, price_confirmed, price_reported_version (PriceTarget)") in res.stderr
