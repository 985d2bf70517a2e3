"""A sale acknowledged to a till survives kill -9 of a real `storelink run` and reaches head office."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from storelink.drivers.sim.till import TillSimulator, make_sale
from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, wait_for, write_config

STORE = "store-0042"


async def _sell_until_killed(port: int, gw: GatewayProcess, acked: list[dict[str, Any]], kill_after: int) -> int:
    """Four cashiers' worth of concurrent sales on one till connection; kill -9 the gateway mid-stream."""
    sim = TillSimulator("127.0.0.1", port, "1")
    await sim.connect()
    refused = 0

    async def cashier() -> None:
        nonlocal refused
        while True:
            sale = make_sale("1")
            try:
                reply = await sim.sale(sale)
            except (ConnectionError, OSError, TimeoutError):
                refused += 1  # no OK came back: the till keeps this sale, nothing was promised
                return
            acked.append({"sale_id": sale["sale_id"], **reply})
            if len(acked) == kill_after:
                await asyncio.to_thread(gw.kill9)

    await asyncio.gather(*(cashier() for _ in range(4)))
    await sim.close()
    return refused


def test_acknowledged_sales_survive_kill9_and_reach_head_office(tmp_path: Path, mosquitto: Mosquitto) -> None:
    till_port = free_port()
    cfg = write_config(tmp_path / "storelink.toml", STORE, mosquitto.port, free_port(),
                       f'[[devices]]\nid = "till-1"\ndriver = "till_tcp"\nlisten = "127.0.0.1:{till_port}"\n'
                       'till_id = "1"\n')
    gw = GatewayProcess(cfg, int(cfg.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])).start()
    try:
        gw.wait_online(15, what="uplink")
        # Head office is unreachable: an acknowledged sale can only be in the gateway's outbox when it dies.
        mosquitto.stop()
        wait_for(lambda: not gw.get("/api/v1/status")[1]["uplink"]["connected"], 15, what="the outage")
        wait_for(lambda: next(d for d in gw.get("/api/v1/status")[1]["devices"] if d["device"] == "till-1")
                 ["details"]["till_id"] == "1", 10, what="till device")
        acked: list[dict[str, Any]] = []
        refused = asyncio.run(_sell_until_killed(till_port, gw, acked, kill_after=60))
        assert len(acked) >= 60 and refused >= 1
        assert gw.proc is not None and gw.proc.returncode == -9

        mosquitto.start()
        head_office = Subscriber(mosquitto.port)
        try:
            gw.start()
            wanted = {a["sale_id"] for a in acked}

            def delivered() -> set[str]:
                return {e["data"]["sale_id"] for e in head_office.events(STORE) if e["kind"] == "sale"}

            wait_for(lambda: wanted <= delivered(), 30, what="every acknowledged sale at head office")
            by_sale = {e["data"]["sale_id"]: e for e in head_office.events(STORE) if e["kind"] == "sale"}
            for a in acked:  # the very event the till was told about: same id and seq
                assert (by_sale[a["sale_id"]]["id"], by_sale[a["sale_id"]]["seq"]) == (a["event_id"], a["seq"])
        finally:
            head_office.close()
    finally:
        gw.stop()
