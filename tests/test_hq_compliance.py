"""Price compliance end to end: the founding story, caught at head office.

A real `storelink run` with a till simulator, ESL tags that check in slowly (so a change takes a few seconds to
confirm) and a paper label printer; head office publishes with the real `storelink hq publish-prices`, which
records each batch in PostgreSQL; the real `storelink hq ingest` lands the store's events and checks every sale.

- During the change (labels not yet confirmed) the till charges what LOOKUP answers, min(old, new): no alert, for
  the raised price and for the lowered one.
- After the change, a till that still charges the old, higher price: an overcharge alert naming the store, the till,
  the sale, the SKU, the charged and the published price.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from storelink.hq.db import open_database
from tests.helpers import STORELINK, Mosquitto, Subscriber, wait_for
from tests.ingest_helpers import IngestProcess, one
from tests.prices_helpers import STORE, items, wait_event, write_items_csv
from tests.test_prices_atomic import TAGGED, Rig, wait_settled


def publish(tmp_path: Path, rig: Rig, version: int, rows: list[dict[str, Any]], database: str, port: int) -> str:
    import subprocess

    key = tmp_path / "hq.key"
    key.write_text(rig.key.private_b64 + "\n")
    csv = write_items_csv(tmp_path / f"v{version}.csv", rows)
    out = subprocess.run([STORELINK, "hq", "publish-prices", str(csv), "--store", STORE, "--key", str(key),
                          "--version", str(version), "--broker", f"127.0.0.1:{port}", "--database", database,
                          "--no-wait"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


def sale(rig: Rig, sale_id: str, sku: str, price: int) -> None:
    body = {"sale_id": sale_id, "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "currency": "EUR",
            "total": price, "lines": [{"sku": sku, "qty": 1, "price": price, "amount": price}],
            "payments": [{"tender": "card", "amount": price}]}
    reply = rig.floor.call(rig.floor.tills["1"].sale(body))
    assert reply["type"] == "OK", reply


def test_overcharge_alert_above_the_published_price_and_none_at_min_old_new_during_a_change(
        tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber, pg_url: str) -> None:
    ingest = IngestProcess(tmp_path, pg_url, mosquitto.port, "w1", "--gap-grace", "2", "--price-grace", "1").start()
    rig = Rig(tmp_path, mosquitto, checkin=3.0, print_seconds=0.2, tills=1)
    db = open_database(pg_url)
    try:
        rig.start()
        rig.floor.start_tills()
        v1 = items(8, base=1000)
        assert "recorded in 127.0.0.1" in publish(tmp_path, rig, 1, v1, pg_url, mosquitto.port)
        wait_settled(rig, 1, TAGGED[:4], 60, what="version 1 on the shelf")
        wait_event(subscriber, "price.confirmed", version=1, timeout=30)
        time.sleep(1.5)  # past --price-grace: v1 is in force and confirmed

        up, down = TAGGED[0], TAGGED[1]
        v2 = [dict(r) for r in v1]
        v2[0]["price"], v2[1]["price"] = 1500, 500  # one raised, one lowered
        publish(tmp_path, rig, 2, v2, pg_url, mosquitto.port)
        wait_event(subscriber, "price.committed", version=2, timeout=30)
        looked_up = {sku: rig.floor.lookup("1", sku) for sku in (up, down)}
        assert all(item and item["transition"] for item in looked_up.values()), looked_up  # labels still changing
        assert looked_up[up]["price"] == 1000 and looked_up[down]["price"] == 500  # type: ignore[index]
        sale(rig, "T1-window-up", up, looked_up[up]["price"])  # type: ignore[index]
        sale(rig, "T1-window-down", down, looked_up[down]["price"])  # type: ignore[index]
        assert not any(e["kind"] == "price.confirmed" and e["data"]["version"] == 2 for e in subscriber.events(STORE))

        wait_event(subscriber, "price.confirmed", version=2, timeout=60)
        time.sleep(1.5)  # past --price-grace after the confirmation
        sale(rig, "T1-after-up", up, 1500)  # the new price, now on every label: fine
        sale(rig, "T1-old-price", down, 1000)  # a till still on its old table: the customer pays 10.00, not 5.00

        def overcharges() -> list[tuple[Any, ...]]:
            return db.query("SELECT store_id, akey, data, message FROM alerts WHERE kind = 'overcharge'")

        wait_for(lambda: one(db, "SELECT count(*) FROM events WHERE store_id = ? AND kind = 'sale'", (STORE,)) == 4,
                 30, what="the four sales at head office")
        wait_for(lambda: one(db, "SELECT compliance_seq FROM stores WHERE store_id = ?", (STORE,))
                 == one(db, "SELECT max(seq) FROM events WHERE store_id = ?", (STORE,)), 30,
                 what="every sale checked")
        wait_for(overcharges, 10, what="the overcharge alert")
        [(store, key, data, message)] = overcharges()
        assert store == STORE and key == "1/T1-old-price/0"
        assert (data["till"], data["sale_id"], data["sku"], data["charged"], data["published"]) == \
            ("1", "T1-old-price", down, 1000, 500)
        assert data["version"] == 2
        assert "till 1 charged 10.00 EUR" in message and "published price 5.00 EUR" in message
        # Both batches recorded once, with every item: by publish-prices or, when it was quicker, by the ingest that
        # saw them on the downlink topic (whichever came second found the record there).
        assert [(b, n) for b, _s, n in db.query("SELECT batch_id, source, item_count FROM price_batches "
                                                  "ORDER BY version")] == [("store-0042-v1", 8), ("store-0042-v2", 8)]
        assert one(db, "SELECT count(*) FROM price_items") == 16
        [(confirmed,)] = db.query("SELECT confirmed_at FROM store_prices WHERE store_id = ? AND version = 2",
                                  (STORE,))
        assert confirmed is not None
    finally:
        db.close()
        rig.close()
        ingest.stop()
