"""`storelink demo` part: head office's side. The ingest lands everything the demo store sends in an embedded SQLite
database, the fleet dashboard shows it, and the overcharge scene plays out: a second till ("till-2") is a POS that
keeps its own price table and never took the change, so once price version 2 is on every label it still charges
3.49 for the chocolate head office now sells at 2.99. Head office raises an overcharge alert, printed here and
shown on the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

from storelink.drivers import till_protocol as tp
from storelink.drivers.sim.till import TillError, TillSimulator

_state: dict[str, Any] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

OLD_PRICE = {"sku": "1002", "description": "Dark chocolate 100 g", "price": 349}  # version 1's price


def prepare(cfg: dict[str, Any], workdir: Path) -> None:
    _state["database"] = f"sqlite:///{workdir / 'head-office.db'}"
    cfg.setdefault("devices", []).append(
        {"id": "till-2", "driver": "till_tcp", "listen": f"127.0.0.1:{free_port()}", "till_id": "2"})


def _say(line: str) -> None:
    print(line, flush=True)


def _start_ingest(port: int, protocol: str) -> tuple[Any, threading.Thread, Any]:
    from storelink.hq.config import HqConfig
    from storelink.hq.ingest import IngestSettings, IngestWorker

    # One worker on a plain subscription: a pilot's set-up (docs/head-office.md).
    settings = IngestSettings(database=_state["database"], worker_id="demo", share_group=None, tracker_every=1.0,
                              gap_grace=10.0, price_grace=2.0, session_expiry=3600)
    worker = IngestWorker(settings)
    worker.open()
    # The demo's broker, not whatever $STORELINK_HQ_CONFIG names: head office's defaults with its address.
    cfg = HqConfig.model_validate({"broker": {"address": f"127.0.0.1:{port}", "protocol": protocol}})
    client = worker.connect(cfg)
    thread = threading.Thread(target=worker.run, name="hq-ingest", daemon=True)
    thread.start()
    return worker, thread, client


async def _till_2(gateway: Any) -> None:
    """Till 2 stays connected (its device is as healthy as the others) and, once version 2 is on every label,
    sells the chocolate at the price its own table still holds."""
    dev = next(d for d in gateway.config.device_configs if d.id == "till-2")
    host, port = tp.parse_address(dev.listen)
    till = TillSimulator(host, port, "2", version=0)
    while till.hello_reply is None:
        with contextlib.suppress(OSError, ConnectionError, TimeoutError, TillError):
            await till.connect()
        if till.hello_reply is None:
            await asyncio.sleep(0.5)
    book = gateway.device_services.prices
    while not (book.active_version == 2 and not (book.lookup("1002") or {}).get("transition")):
        await asyncio.sleep(1.0)
    await asyncio.sleep(3.0)
    sale = {"sale_id": f"T2-{int(time.time())}", "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "currency": "EUR", "total": OLD_PRICE["price"],
            "lines": [{**OLD_PRICE, "qty": 1, "amount": OLD_PRICE["price"]}],
            "payments": [{"tender": "card", "amount": OLD_PRICE["price"]}]}
    try:
        await till.sale(sale)
    except (OSError, ConnectionError, TimeoutError, TillError) as err:
        _say(f"   *  till-2 could not ring up its sale: {err}")
        return
    _say(f"   *  till-2 rings up sale {sale['sale_id']}: 1002 Dark chocolate at 3.49 EUR, from the till's own old "
         "price table (head office now sells it at 2.99)")
    await till.closed.wait()  # stays connected, like till-1


async def _report_alerts(database: str, base_url: str, store: str) -> None:
    from storelink.hq.db import open_database

    db = await asyncio.to_thread(open_database, database)
    seen: set[int] = set()
    try:
        while True:
            rows = await asyncio.to_thread(db.query, "SELECT id, kind, message FROM alerts WHERE id > ? ORDER BY id",
                                           (max(seen, default=0),))
            for alert_id, kind, message in rows:
                seen.add(alert_id)
                _say(f"   *  head office ALERT {kind}: {message}  -> {base_url}/store?id={store}")
            await asyncio.sleep(1.0)
    finally:
        db.close()


async def run(gateway: Any) -> None:
    from storelink.hq.dashboard import Dashboard

    mqtt_cfg = gateway.config.mqtt
    # After the demo's other clients: the embedded broker (amqtt) can fail a connection whose subscriptions land
    # while another client is connecting ("dictionary changed size during iteration").
    await asyncio.sleep(1.0)
    worker, thread, client = await asyncio.to_thread(_start_ingest, mqtt_cfg.port, mqtt_cfg.protocol)
    dashboard = Dashboard(_state["database"], f"127.0.0.1:{free_port()}")
    await dashboard.start()
    assert dashboard.bound is not None
    base_url = "http://{}:{}".format(*dashboard.bound)
    _say(f"   *  head office's ingest runs into {_state['database']}; its fleet dashboard: {base_url}/")
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_report_alerts(_state["database"], base_url, gateway.config.store_id))
            tg.create_task(_till_2(gateway))
    finally:
        await dashboard.stop()
        worker.stop_event.set()
        await asyncio.to_thread(thread.join, 10)
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop_stop()
        worker.close()

