"""`storelink demo` part: head office publishes signed price lists and a price change rolls across the simulated
till, the ZPL printer and the ESL tags (those devices come from drivers/sim/till_demo.py and
drivers/sim/labels_demo.py).

Version 1 installs the demo's price list; a little later version 2 raises one price and lowers another. While the
labels confirm (the demo's tags check in every few seconds, the printer takes half a second a label) the console
shows what a LOOKUP answers: min(old, new) until every label shows the new price.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

_state: dict[str, Any] = {}
DEMO_ITEMS = [
    {"sku": "1001", "gtin": "4006381333931", "price": 199, "unit_price": 199, "unit_basis": "l",
     "description": "Oat milk 1 l"},
    {"sku": "1002", "gtin": "4006381333948", "price": 349, "description": "Dark chocolate 100 g",
     "unit_price": 349, "unit_basis": "100g"},
    {"sku": "1003", "gtin": "4006381333955", "price": 89, "description": "Sparkling water 0.5 l"},
    {"sku": "1004", "gtin": "4006381333962", "price": 1299, "description": "Olive oil 750 ml"},
]


def prepare(cfg: dict[str, Any], workdir: Path) -> None:
    from storelink.remote.signing import keygen

    pair = keygen()
    _state["key"] = pair.private_b64
    cfg.setdefault("trust", {}).setdefault("public_keys", []).append(pair.public_b64)
    cfg["prices"] = {"prepare_deadline": 30.0, "confirm_poll": 1.0, "stale_check": 2.0, "abort_hold": 10.0}


def _say(line: str) -> None:
    print(line, flush=True)


async def run(gateway: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from storelink.hq.batch import build_batch

    store = gateway.config.store_id
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-hq-prices", protocol=mqtt.MQTTv311)
    await asyncio.to_thread(client.connect, "127.0.0.1", gateway.config.mqtt.port)
    client.loop_start()
    book = gateway.device_services.prices

    async def publish(version: int, rows: list[dict[str, Any]]) -> None:
        b = build_batch(rows, version=version, batch_id=f"demo-v{version}", store=store, key=_state["key"])
        _say(f"[head office] publishing signed price list version {version} ({len(rows)} items, "
             f"{len(b.messages) - 1} chunk)")
        for message in b.messages:
            client.publish(f"storelink/{store}/prices/batch", message, qos=1)
        client.publish(f"storelink/{store}/prices/desired",
                       json.dumps({"version": version, "batch_id": b.batch_id}), qos=1, retain=True)

    try:
        await asyncio.sleep(3)  # let the till connect and the devices come up
        await publish(1, DEMO_ITEMS)
        await asyncio.sleep(15)
        rows = [dict(r) for r in DEMO_ITEMS]
        rows[0]["price"] = rows[0]["unit_price"] = 249
        rows[1]["price"] = rows[1]["unit_price"] = 299
        _say("[head office] price change: 1001 Oat milk 1.99 -> 2.49 (up), 1002 Dark chocolate 3.49 -> 2.99 (down)")
        await publish(2, rows)
        last = ""
        for _ in range(120):
            answers = [book.lookup(sku) for sku in ("1001", "1002")]
            line = "  ".join(
                f"{a['sku']}={a['price'] / 100:.2f}{' (min of old/new while labels change)' if a['transition'] else ''}"
                for a in answers if a) + f"  [book version {book.active_version}]"
            if line != last:
                _say(f"[price book] LOOKUP answers: {line}")
                last = line
            if answers[0] and answers[0]["version"] == 2 and not any(a and a["transition"] for a in answers):
                _say("[price book] every label confirmed version 2: tills now charge the new prices")
                break
            await asyncio.sleep(0.5)
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            client.loop_stop()
            client.disconnect()

