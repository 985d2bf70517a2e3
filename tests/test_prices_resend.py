"""Item 7 of issue 12 on real `storelink run` processes: a fresh store's first batch never makes it ask head office
for a resend (the batch and its retained prices/desired travel on different topics and used to race), and a
GET of the price state publishes nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, wait_for, write_config
from tests.prices_helpers import Publisher, batch, items, make_key, prices_config

RUNS, AT_ONCE = 20, 10
GRACE = 1.0  # [prices] resend_grace in these gateways (prices_config)


def test_a_fresh_store_never_asks_for_a_resend_of_its_first_batch(tmp_path: Path, mosquitto: Mosquitto,
                                                                 subscriber: Subscriber) -> None:
    key = make_key()
    hq = Publisher(mosquitto.port)
    try:
        for group in range(RUNS // AT_ONCE):
            stores = [f"store-fresh-{group * AT_ONCE + i:02d}" for i in range(AT_ONCE)]
            gateways = []
            for store in stores:
                work = tmp_path / store
                work.mkdir()
                port = free_port()
                cfg = write_config(work / "storelink.toml", store, mosquitto.port, port, prices_config(key))
                gateways.append(GatewayProcess(cfg, port).start(wait=False))
            try:
                for gw in gateways:
                    gw.wait_ready(30)
                    gw.wait_online(20)
                for store in stores:  # exactly what `storelink hq publish-prices` does: batch, then desired
                    b = batch(key, 7, items(50), batch_id=f"{store}-v7", store=store)
                    hq.batch(b, store=store)
                    hq.send(f"storelink/{store}/prices/desired",
                            [json.dumps({"version": 7, "batch_id": b.batch_id}).encode()], retain=True)
                for store in stores:
                    wait_for(lambda s=store: any(e["kind"] == "price.committed" for e in subscriber.events(s)), 30,
                             what=f"{store} committed its first batch")
                time.sleep(GRACE + 1.0)  # past the grace: a resend request would have gone out by now
                asked = [s for s in stores if any(e["kind"] == "price.resend_requested" for e in subscriber.events(s))]
                assert not asked, f"resend requested on a fresh store's first batch: {asked}"
            finally:
                for gw in gateways:
                    gw.stop()
                for store in stores:
                    hq.send(f"storelink/{store}/prices/desired", [b""], retain=True)  # clear the retained message

        # a store that really is behind still asks, once the grace is over
        work = tmp_path / "behind"
        work.mkdir()
        port = free_port()
        gw = GatewayProcess(write_config(work / "storelink.toml", "store-behind", mosquitto.port, port,
                                         prices_config(key)), port).start()
        try:
            gw.wait_online()
            hq.send("storelink/store-behind/prices/desired", [b'{"version": 9, "batch_id": "b9"}'], retain=True)
            wait_for(lambda: any(e["kind"] == "price.resend_requested" for e in subscriber.events("store-behind")),
                     GRACE + 10, what="a resend request from a store that is behind")

            # GET /api/v1/prices/state builds the state; it does not publish the retained message
            topic = "storelink/store-behind/prices/state"
            wait_for(lambda: any(t == topic for t, _p, _r in subscriber.messages), 10, what="the state published")
            time.sleep(1.0)  # the publisher's debounce has settled
            before = sum(1 for t, _p, _r in subscriber.messages if t == topic)
            for _ in range(5):
                assert gw.get("/api/v1/prices/state")[1]["store_id"] == "store-behind"
            time.sleep(1.0)
            assert sum(1 for t, _p, _r in subscriber.messages if t == topic) == before
        finally:
            gw.stop()
            hq.send("storelink/store-behind/prices/desired", [b""], retain=True)
    finally:
        hq.close()
