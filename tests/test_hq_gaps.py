"""Seq gaps at head office: telemetry a store evicted under its cap is told apart from events really missing.

A real `storelink run` with a small outbox is cut off from the broker while scans and sales pour in: it evicts the
oldest scans, reports the evicted seq ranges in `outbox.evicted` events, and delivers the rest when the broker is
back. A simulated store next to it loses two events for real (the broker never got them). The ingest runs on its
embedded SQLite default here (the other ingest tests run PostgreSQL).
"""

from __future__ import annotations

import time
from pathlib import Path

from storelink.drivers.sim.fleet import Fleet
from storelink.hq.db import open_database
from tests.helpers import GatewayProcess, Mosquitto, free_port, wait_for
from tests.ingest_helpers import IngestProcess, one


def test_eviction_gaps_are_explained_and_real_gaps_raise_an_alarm_with_the_range(tmp_path: Path) -> None:
    # A broker that keeps head office's session across its restart (as a production one must: without it, what the
    # stores send before the ingest has subscribed again is lost, and head office would rightly call it missing).
    # One worker on a plain subscription: Mosquitto 2.0 does not restore shared subscriptions from persistence.
    (tmp_path / "broker").mkdir()
    mosquitto = Mosquitto(tmp_path, extra_conf=f"persistence true\npersistence_location {tmp_path / 'broker'}/\n")
    mosquitto.start()
    database = f"sqlite:///{tmp_path / 'hq.db'}"
    ingest = IngestProcess(tmp_path, database, mosquitto.port, "w1", "--gap-grace", "2", "--no-share").start()
    http_port = free_port()
    config = tmp_path / "storelink.toml"
    config.write_text(
        f'store_id = "store-evict"\n[mqtt]\nhost = "127.0.0.1"\nport = {mosquitto.port}\nreconnect_min = 0.2\n'
        f'reconnect_max = 1.0\n[storage]\npath = "{tmp_path / "outbox.db"}"\nmax_events = 100\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n')
    gw = GatewayProcess(config, http_port).start()
    fleet = Fleet("127.0.0.1", mosquitto.port, ["store-lossy"], connections=1)
    db = open_database(database)
    try:
        gw.wait_online()
        assert gw.post("/api/v1/events", [{"kind": "sale", "device": "till-1", "data": {"n": i}}
                                          for i in range(5)])[0] == 202
        wait_for(lambda: one(db, "SELECT count(*) FROM events WHERE store_id = 'store-evict'") == 5, 20,
                 what="the first sales at head office")
        mosquitto.stop()
        batch = []
        for i in range(160):  # 200 events into an outbox capped at 100: the oldest scans are evicted
            batch.append({"kind": "scan", "device": "scanner-1", "data": {"code": f"{i:08d}"}})
            if i % 4 == 0:
                batch.append({"kind": "sale", "device": "till-1", "data": {"n": 100 + i}})
        for i in range(0, len(batch), 10):
            assert gw.post("/api/v1/events", batch[i:i + 10])[0] == 202
        evicted = gw.get("/api/v1/status")[1]["outbox"]["evicted_total"]
        assert evicted >= 100
        mosquitto.start()

        # The simulated store: seq 1..30 but 11 and 12 never reach the broker. It reports its outbox on connect
        # (like every gateway, then every 30 s): nothing evicted.
        store = fleet.stores[0]
        fleet.births()
        fleet.send(store, *store.outbox_state(evicted_total=0), retain=True)
        fleet.burst(30, skip={"store-lossy": {11, 12}})
        fleet.drain()
        wait_for(lambda: db.query("SELECT state FROM seq_gaps WHERE store_id = 'store-lossy'") == [("open",)], 20,
                 what="the real gap seen")
        # Past the grace, the gap stays open while no report newer than the gap says that every eviction has been
        # reported: one could still be on its way. The next periodic report settles it.
        time.sleep(3)
        assert db.query("SELECT state FROM seq_gaps WHERE store_id = 'store-lossy'") == [("open",)]
        fleet.send(store, *store.outbox_state(evicted_total=0), retain=True)
        fleet.drain()

        def settled() -> bool:
            states = {s for (s,) in db.query("SELECT state FROM seq_gaps WHERE store_id = 'store-evict'")}
            return states == {"evicted"} and one(db, "SELECT count(*) FROM seq_gaps WHERE store_id = 'store-lossy' "
                                                     "AND state = 'missing'") == 1
        wait_for(settled, 40, what="evicted gaps explained, the real one missing")

        # Every seq the gateway evicted is accounted for as evicted, and nothing else is missing for it.
        assert one(db, "SELECT sum(last_seq - first_seq + 1) FROM seq_gaps WHERE store_id = 'store-evict'") \
            == evicted
        delivered = one(db, "SELECT count(*) FROM events WHERE store_id = 'store-evict'")
        top = one(db, "SELECT max(seq) FROM events WHERE store_id = 'store-evict'")
        assert delivered + evicted == top
        kinds = {k for (k,) in db.query("SELECT DISTINCT kind FROM events WHERE store_id = 'store-evict'")}
        assert "outbox.evicted" in kinds
        assert one(db, "SELECT count(*) FROM events WHERE store_id = 'store-evict' AND kind = 'sale'") == 5 + 40
        assert db.query("SELECT kind FROM alerts WHERE store_id = 'store-evict'") == []

        [(key, message, closed)] = db.query("SELECT akey, message, closed_at FROM alerts WHERE kind = 'seq_gap'")
        assert (key, closed) == ("11", None) and "seq 11-12" in message and "2 events missing" in message
        assert db.query("SELECT first_seq, last_seq FROM seq_gaps WHERE store_id = 'store-lossy'") == [(11, 12)]
    finally:
        db.close()
        fleet.close()
        gw.stop()
        ingest.stop()
        mosquitto.stop()
