"""Head office's rules on their own, against the embedded SQLite database (no broker): the schema and its
migrations, the price a store may charge around a change, gap settling, and incidents recorded once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storelink.hq.compliance import PriceTimeline
from storelink.hq.db import Database, DatabaseError, open_database
from storelink.hq.published import record_batch
from storelink.hq.schema import LATEST, migrate, schema_version
from storelink.hq.tracker import Tracker, _subtract

T0 = 1_800_000_000.0


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = open_database(f"sqlite:///{tmp_path / 'hq.db'}")
    migrate(d)
    return d


def batch(db: Database, version: int, prices: dict[str, int], at: float, *, mode: str = "full",
          store: str | None = "s1", group: str | None = None) -> str:
    batch_id = f"b{version}-{store or group}"
    manifest = {"batch_id": batch_id, "version": version, "target": {"store": store} if store else {"group": group},
                "mode": mode, "currency": "EUR"}
    record_batch(db, manifest, [{"sku": k, "price": v} for k, v in prices.items()], source="test", key_id=None,
                 published_at=at)
    return batch_id


def confirm(db: Database, batch_id: str, at: float, store: str = "s1") -> None:
    db.execute("INSERT INTO store_prices (store_id, batch_id, confirmed_at) VALUES (?, ?, ?)", (store, batch_id, at))


def test_schema_is_created_once_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hq.db'}"
    d = open_database(url)
    assert schema_version(d) == 0
    assert migrate(d) == 0 and schema_version(d) == LATEST
    assert migrate(d) == LATEST  # a second start changes nothing
    d.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, 'from the future', 0)",
              (LATEST + 1,))
    with pytest.raises(DatabaseError, match="newer than this storelink knows"):
        migrate(d)
    with pytest.raises(DatabaseError, match="postgresql://"):
        open_database("mysql://x/y")


def test_the_price_a_store_may_charge_around_a_change(db: Database) -> None:
    v1 = batch(db, 1, {"A": 1000, "B": 1000, "C": 300}, T0)
    confirm(db, v1, T0 + 5)
    v2 = batch(db, 2, {"A": 1500, "B": 500}, T0 + 100)  # A raised, B lowered, C dropped (a full list)
    t = PriceTimeline(db, "s1", [], {})
    assert t.legit("A", None, T0 + 50) == (1000, 1000, 1)  # before v2
    # While v2's labels change: min(old, new) for both directions, the published price is the new one.
    assert t.legit("A", None, T0 + 150) == (1000, 1500, 2)
    assert t.legit("B", None, T0 + 150) == (500, 500, 2)
    assert t.legit("C", None, T0 + 150) is None  # not in the full list any more: not judged
    confirm(db, v2, T0 + 200)
    t = PriceTimeline(db, "s1", [], {})
    assert t.legit("A", None, T0 + 250) == (1500, 1500, 2)
    # The grace: near an edge the higher neighbouring price is allowed, further away it is not.
    assert t.check("B", None, T0 + 103, grace=10).allowed == 1000  # type: ignore[union-attr]
    assert t.check("B", None, T0 + 150, grace=10).allowed == 500  # type: ignore[union-attr]
    assert t.check("A", None, T0 + 195, grace=10).allowed == 1500  # type: ignore[union-attr]
    assert t.check("A", None, T0 + 150, grace=10).allowed == 1000  # type: ignore[union-attr]


def test_group_batches_and_deltas_apply_to_the_stores_of_the_group(db: Database) -> None:
    g = batch(db, 1, {"A": 200, "B": 300}, T0, store=None, group="north")
    confirm(db, g, T0 + 1)
    batch(db, 2, {"B": 250}, T0 + 10, mode="delta", store=None, group="north")
    north = PriceTimeline(db, "s1", ["north"], {})
    assert north.legit("A", None, T0 + 20) == (200, 200, 1)  # a delta leaves A as it was
    assert north.legit("B", None, T0 + 20) == (250, 250, 2)
    assert PriceTimeline(db, "s1", ["south"], {}).legit("A", None, T0 + 20) is None


def test_subtract_splits_a_gap_into_evicted_runs_and_holes() -> None:
    assert _subtract(10, 20, set(), []) == [(10, 20, "hole")]
    assert _subtract(10, 20, {12, 15}, [(16, 18)]) == [(10, 11, "hole"), (13, 14, "hole"), (16, 18, "evicted"),
                                                      (19, 20, "hole")]
    assert _subtract(1, 10**9, set(), [(1, 10**9)]) == [(1, 10**9, "evicted")]  # boundaries only: fast


def test_a_gap_waits_for_the_eviction_report_then_is_explained_or_missing(db: Database) -> None:
    def event(seq: int, kind: str = "scan", data: dict[str, object] | None = None) -> None:
        db.execute("INSERT INTO events (id, store_id, seq, kind, device, ts, received_at, data) VALUES "
                   "(?, 's1', ?, ?, 'd', ?, ?, ?)", (f"e{seq}", seq, kind, T0, T0, json.dumps(data or {})))

    def state(at: float, evicted_total: int) -> None:
        db.execute("INSERT INTO retained (store_id, topic, worker, payload, received_at, live_at) VALUES "
                   "('s1', 'outbox/state', 'w', ?, ?, ?) ON CONFLICT (store_id, topic, worker) DO UPDATE SET "
                   "payload = excluded.payload, received_at = excluded.received_at, live_at = excluded.live_at",
                   (json.dumps({"depth": 0, "evicted_total": evicted_total, "oldest_undelivered_at": None}), at, at))

    db.execute("INSERT INTO stores (store_id, first_seen) VALUES ('s1', ?)", (T0,))
    tracker = Tracker(db, gap_grace=5)
    state(T0, 0)
    for seq in (1, 2, 3, 6, 7, 10):
        event(seq)
    tracker.run_pass(T0 + 1)
    assert db.query("SELECT first_seq, last_seq, state FROM seq_gaps ORDER BY first_seq") == [(4, 5, "open"),
                                                                                              (8, 9, "open")]
    state(T0 + 2, 2)  # it evicted 2 so far and has reported none: wait for the report
    tracker.run_pass(T0 + 10)
    assert {s for (s,) in db.query("SELECT state FROM seq_gaps")} == {"open"}
    event(11, "outbox.evicted", {"ranges": [[4, 5]], "count": 2, "evicted_total": 2})
    tracker.run_pass(T0 + 11)
    state(T0 + 12, 2)  # its next report: nothing left unreported
    tracker.run_pass(T0 + 13)
    assert db.query("SELECT first_seq, last_seq, state FROM seq_gaps ORDER BY first_seq") == [(4, 5, "evicted"),
                                                                                              (8, 9, "missing")]
    [(key, closed)] = db.query("SELECT akey, closed_at FROM alerts WHERE kind = 'seq_gap'")
    assert (key, closed) == ("8", None)
    event(8)  # a late arrival (a refused event retried by the store): the alarm shrinks to what is still missing
    tracker.run_pass(T0 + 14)
    assert db.query("SELECT first_seq, last_seq, state FROM seq_gaps WHERE state = 'missing'") == [(9, 9, "missing")]
    event(9)
    tracker.run_pass(T0 + 15)
    assert db.query("SELECT count(*) FROM alerts WHERE kind = 'seq_gap' AND closed_at IS NULL") == [(0,)]


def test_a_report_that_came_before_the_event_revealing_a_gap_does_not_settle_it(db: Database) -> None:
    """A tracker pass starts (its `now`), the store's outbox report arrives, then the event after a hole, and the
    pass's seq step sees both: the report was made before head office knew of the gap, so the gap stays open
    past the grace until a later report (found under load by test_hq_gaps.py)."""
    db.execute("INSERT INTO stores (store_id, first_seen) VALUES ('s1', ?)", (T0,))
    for seq, at in ((1, T0), (2, T0), (5, T0 + 2)):
        db.execute("INSERT INTO events (id, store_id, seq, kind, device, ts, received_at, data) VALUES "
                   "(?, 's1', ?, 'scan', 'd', ?, ?, '{}')", (f"e{seq}", seq, at, at))
    db.execute("INSERT INTO retained (store_id, topic, worker, payload, received_at, live_at) VALUES "
               "('s1', 'outbox/state', 'w', ?, ?, ?)", (json.dumps({"depth": 0, "evicted_total": 0}), T0 + 1.5,
                                                         T0 + 1.5))
    tracker = Tracker(db, gap_grace=5)
    tracker.run_pass(T0 + 1)
    tracker.run_pass(T0 + 20)
    assert db.query("SELECT first_seq, last_seq, state FROM seq_gaps") == [(3, 4, "open")]


def test_an_overcharge_is_recorded_once_even_when_the_sale_comes_twice(db: Database) -> None:
    v1 = batch(db, 1, {"A": 500}, T0)
    confirm(db, v1, T0 + 1)
    db.execute("INSERT INTO stores (store_id, first_seen) VALUES ('s1', ?)", (T0,))
    sale = {"till_id": "3", "sale_id": "S-1", "ts": "2027-01-15T08:00:00Z", "currency": "EUR",
            "lines": [{"sku": "A", "qty": 1, "price": 600}, {"sku": "A", "qty": 1, "price": 500}]}
    for seq, event_id in ((1, "e1"), (2, "e2")):  # the same sale again with a new event id (a till's resend)
        db.execute("INSERT INTO events (id, store_id, seq, kind, device, ts, received_at, data) VALUES "
                   "(?, 's1', ?, 'sale', 'till-3', ?, ?, ?)", (event_id, seq, T0 + 100, T0 + 100, json.dumps(sale)))
    Tracker(db, gap_grace=5).run_pass(T0 + 200)
    rows = db.query("SELECT akey, data FROM alerts WHERE kind = 'overcharge'")
    assert len(rows) == 1 and rows[0][0] == "3/S-1/0"
    data = json.loads(rows[0][1])
    assert (data["charged"], data["published"], data["till"], data["sku"]) == (600, 500, "3", "A")
