"""The price database: one of an earlier release opens with this one (schema 2 adds the journal's new columns) and
a rollback to release 1 could still use it (readable_by 1); its connections across threads (closing it while
another thread is in the middle of a read, the status build in a worker thread when the gateway stops, must
neither crash the process nor break that read: closing a sqlite3 connection another thread is using segfaulted a
test worker once); and what lookups answer while transitions of several versions are open."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from storelink.prices.book import PriceBook, settle_skus
from storelink.prices.db import ADDED_COLUMNS, SCHEMA, PriceDb, get_meta, set_meta
from storelink.system.schema import SCHEMAS


def test_a_read_in_flight_when_the_database_closes_finishes_on_its_own_connection(tmp_path: Path) -> None:
    db = PriceDb(tmp_path / "prices.db")
    db.open()
    writer = sqlite3.connect(db.path)
    set_meta(writer, "active_version", 7)
    writer.commit()
    writer.close()

    inside, closed = threading.Event(), threading.Event()
    result: list[str | None] = []
    errors: list[BaseException] = []

    def read_across_close() -> None:
        try:
            conn = db.reader()
            result.append(get_meta(conn, "active_version"))
            inside.set()
            assert closed.wait(10)
            result.append(get_meta(conn, "active_version"))  # the same connection, after close()
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    reader = threading.Thread(target=read_across_close)
    reader.start()
    assert inside.wait(10)
    db.close()
    closed.set()
    reader.join(10)
    assert not errors, errors
    assert result == ["7", "7"]


def test_a_thread_gets_a_fresh_reader_after_close(tmp_path: Path) -> None:
    first = PriceDb(tmp_path / "prices.db")
    first.open()
    old = first.reader()
    first.close()
    fresh = first.reader()  # this thread's reader from before close() is replaced, not reused
    assert fresh is not old
    with pytest.raises(sqlite3.ProgrammingError):  # closed by its own thread when it was replaced
        old.execute("SELECT 1")
    assert get_meta(fresh, "missing", "none") == "none"


def test_a_schema_1_price_book_is_migrated_and_stays_readable_by_release_1(tmp_path: Path) -> None:
    path = tmp_path / "prices.db"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA)  # the tables of release 1: SCHEMA itself never changed, columns were added
    old.execute("CREATE TABLE schema_info(name TEXT PRIMARY KEY, version INTEGER NOT NULL, "
                "readable_by INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_info VALUES('prices', 1, 1)")
    old.execute("INSERT INTO targets(batch_id, device, role, state, updated_at) VALUES('b1', 'till-1', 'till', "
                "'committed', 0)")
    old.commit()
    old.close()
    db = PriceDb(path, "NORMAL")
    db.open()
    db.close()
    conn = sqlite3.connect(path)
    for table, columns in ADDED_COLUMNS.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        assert {c.split()[0] for c in columns} <= have, table
    assert conn.execute("SELECT version, readable_by FROM schema_info WHERE name='prices'").fetchone() == (2, 1)
    assert conn.execute("SELECT state, held, final_left FROM targets").fetchone() == ("committed", 0, None)
    assert SCHEMAS["prices"].version == 2 and SCHEMAS["prices"].readable_by == 1


def _book_with_two_versions(db: PriceDb) -> None:
    """Version 1 added SKU-A at 100 and its labels still print (its transition is open, as the settler left it);
    version 2 raised SKU-A to 150 and is in the book."""
    def txn(conn: sqlite3.Connection) -> None:
        for bid, version in (("b1", 1), ("b2", 2)):
            conn.execute("INSERT INTO batches(batch_id, version, source, phase, received_at, updated_at) "
                         "VALUES(?, ?, 'test', 'done', 0, 0)", (bid, version))
            conn.execute("INSERT INTO transitions(batch_id, outcome, since) VALUES(?, 'committed', ?)", (bid, version))
        conn.execute("INSERT INTO changes VALUES('b1', 'SKU-A', NULL, 100, 'add')")
        conn.execute("INSERT INTO changes VALUES('b1', 'SKU-B', NULL, 70, 'add')")
        conn.execute("INSERT INTO changes VALUES('b2', 'SKU-A', 100, 150, 'change')")
        conn.execute("INSERT INTO book(sku, price, description) VALUES('SKU-A', 150, 'a'), ('SKU-B', 70, 'b')")
        set_meta(conn, "active_version", 2)
    asyncio.run(db.write(txn))


def test_once_a_newer_version_shows_on_every_label_lookups_answer_its_price(tmp_path: Path) -> None:
    """The cause of a flaky LOOKUP after price.confirmed: an older batch's transition, still open while its own
    labels print, kept capping the newer version's price (an added item at its first price)."""
    db = PriceDb(tmp_path / "prices.db", "NORMAL")
    db.open()
    try:
        _book_with_two_versions(db)
        book = PriceBook(db)
        assert book.lookup("SKU-A")["price"] == 100  # type: ignore[index]  # v2's labels change: min(100, 150)
        left = asyncio.run(db.write(settle_skus, "b2", ["SKU-A"], True))
        assert left == 0
        item = book.lookup("SKU-A")
        assert item is not None and item["price"] == 150 and item["transition"] is False
        # version 1's transition goes on for what it still has (an add: no floor below its own price)
        assert book.lookup("SKU-B")["price"] == 70  # type: ignore[index]
    finally:
        db.close()


def test_an_added_item_never_caps_a_later_price(tmp_path: Path) -> None:
    """Even while both transitions are open, an add is no price change: only version 2's min(old, new) counts."""
    db = PriceDb(tmp_path / "prices.db", "NORMAL")
    db.open()
    try:
        _book_with_two_versions(db)
        asyncio.run(db.write(lambda c: c.execute("UPDATE changes SET old_price=120 WHERE batch_id='b2'")))
        assert PriceBook(db).lookup("SKU-A")["price"] == 120  # type: ignore[index]
    finally:
        db.close()
