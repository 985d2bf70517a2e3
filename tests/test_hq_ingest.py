"""`storelink hq ingest` against a real Mosquitto and a real PostgreSQL: nothing lost, nothing twice.

- kill -9 of the worker in the middle of a burst, then a restart under the same worker id: every event is in the
  table exactly once (the messages it had not acknowledged waited in its broker session).
- two workers on one MQTT 5 shared subscription split the burst and together land every event exactly once.
- bad messages are kept with their reason and acknowledged (never redelivered forever).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storelink.drivers.sim.fleet import Fleet
from storelink.hq.db import Database, open_database
from tests.helpers import Mosquitto, wait_for
from tests.ingest_helpers import IngestProcess, one

STORES = [f"store-{i:03d}" for i in range(20)]


@pytest.fixture
def hq_db(pg_url: str) -> Iterator[Database]:
    db = open_database(pg_url)
    yield db
    db.close()


def exactly_once(db: Database, expected: int) -> None:
    assert one(db, "SELECT count(*) FROM events") == expected
    assert one(db, "SELECT count(DISTINCT id) FROM events") == expected
    # Per store, seq 1..n with no hole and no repeat: every event, each once.
    for store, n, low, high, distinct in db.query(
            "SELECT store_id, count(*), min(seq), max(seq), count(DISTINCT seq) FROM events GROUP BY store_id"):
        assert (low, high, distinct) == (1, n, n), store


def test_kill9_mid_burst_then_restart_lands_every_event_exactly_once(
        tmp_path: Path, mosquitto: Mosquitto, pg_url: str, hq_db: Database) -> None:
    worker = IngestProcess(tmp_path, pg_url, mosquitto.port, "w1").start()
    fleet = Fleet("127.0.0.1", mosquitto.port, STORES, connections=2)
    try:
        fleet.births()
        per_store = 1000
        total = per_store * len(STORES)
        burst_done: list[float] = []
        import threading

        sender = threading.Thread(target=lambda: (fleet.burst(per_store), fleet.drain(), burst_done.append(1)))
        sender.start()
        # Kill it while the burst is landing: some events committed, some committed but not yet acknowledged,
        # some received and not committed, and the rest still on their way.
        wait_for(lambda: one(hq_db, "SELECT count(*) FROM events") > total // 4, 60, what="a quarter landed")
        worker.kill9()
        landed_at_kill = one(hq_db, "SELECT count(*) FROM events")
        assert landed_at_kill < total
        sender.join(120)
        assert burst_done, "the simulated stores could not publish the burst"
        worker.start()  # the same worker id: its broker session holds everything it had not acknowledged
        wait_for(lambda: one(hq_db, "SELECT count(*) FROM events") >= total, 90, what="every event landed")
        time.sleep(1.0)  # anything delivered twice would land now
        exactly_once(hq_db, total)
        assert worker.terminate() == 0
    finally:
        fleet.close()
        worker.stop()


def test_two_workers_on_a_shared_subscription_split_the_load_and_land_every_event_once(
        tmp_path: Path, mosquitto: Mosquitto, pg_url: str, hq_db: Database) -> None:
    w1 = IngestProcess(tmp_path, pg_url, mosquitto.port, "w1").start()
    w2 = IngestProcess(tmp_path, pg_url, mosquitto.port, "w2").start()
    fleet = Fleet("127.0.0.1", mosquitto.port, STORES, connections=2)
    try:
        fleet.births()
        total = fleet.burst(500)
        fleet.drain()
        wait_for(lambda: one(hq_db, "SELECT count(*) FROM events") >= total, 60, what="every event landed")
        assert w1.terminate() == 0 and w2.terminate() == 0  # a clean stop writes the final counters
        exactly_once(hq_db, total)
        shares = dict(hq_db.query("SELECT worker, inserted_total FROM workers"))
        assert sum(shares.values()) == total
        # The broker spreads the shared subscription over both (round robin in Mosquitto).
        assert min(shares.values()) > total * 0.3, shares
        # Only one ran the tracker (the database lock), and it followed every store without a gap.
        assert one(hq_db, "SELECT count(*) FROM stores") == len(STORES)
        wait_for(lambda: one(hq_db, "SELECT count(*) FROM stores WHERE checked_seq = 500") == len(STORES), 20,
                 what="the tracker")
    finally:
        fleet.close()
        w1.stop()
        w2.stop()


def test_bad_messages_are_kept_with_a_reason_and_not_redelivered(
        tmp_path: Path, mosquitto: Mosquitto, pg_url: str, hq_db: Database) -> None:
    worker = IngestProcess(tmp_path, pg_url, mosquitto.port, "w1").start()
    fleet = Fleet("127.0.0.1", mosquitto.port, ["store-bad"], connections=1)
    try:
        store = fleet.stores[0]
        good = store.event("sale", {"total": 100})
        fleet.send(store, *good)
        fleet.send(store, store.topic("events/sale"), b"\xff not json")
        fleet.send(store, store.topic("events/sale"), b"\x00\x01 not json either")  # its head is kept, NUL-free
        fleet.send(store, store.topic("events/scan"), json.dumps({"id": "x", "seq": 0}).encode())
        fleet.send(store, store.topic("events/scan"), good[1])  # right fields, wrong topic: kind mismatch
        # JSON that Python's json module accepts but PostgreSQL cannot store (NaN, a lone surrogate, NUL in jsonb
        # or in a text column): had one reached the batch, its commit would fail, and be retried, for ever.
        hostile = [b'{"total": NaN}', b'{"total": 1e999}', b'{"name": "\\ud800"}', b'{"name": "a\\u0000b"}',
                   b'{"\\u0000": 1}', b"[" * 40 + b"]" * 40]
        for data in hostile:
            _topic, body = store.event("scan", {"x": 0})
            fleet.send(store, store.topic("events/scan"), body.replace(b'{"x":0}', data))
        _topic, body = store.event("scan", {"x": 0}, device="nul\u0000device")
        fleet.send(store, store.topic("events/scan"), body)
        fleet.send(store, store.topic("outbox/state"), b'{"depth": NaN}', retain=True)
        after = store.event("sale", {"total": 200})  # the ingest goes on after all of them
        fleet.send(store, *after)
        fleet.drain()
        bad = 4 + len(hostile) + 2
        wait_for(lambda: one(hq_db, "SELECT count(*) FROM bad_messages") == bad, 20, what="bad messages kept")
        reasons = sorted(r for (r,) in hq_db.query("SELECT reason FROM bad_messages"))
        assert any(r.startswith("kind 'sale' does not match") for r in reasons)
        assert any("no valid seq" in r for r in reasons)
        assert sum(r.startswith("not JSON") for r in reasons) == 2 + len(hostile) + 2, reasons
        assert sum("NUL" in r for r in reasons) == 3, reasons
        wait_for(lambda: one(hq_db, "SELECT count(*) FROM events") == 2, 20, what="the good events")
        fleet.send(store, store.topic("outbox/state"), b"", retain=True)  # else every subscribe gets it again
        fleet.drain()
        worker.kill9()
        worker.start()  # had they not been acknowledged, the broker would hand them over again now
        time.sleep(2)
        assert one(hq_db, "SELECT count(*) FROM bad_messages") == bad
    finally:
        fleet.close()
        worker.stop()
