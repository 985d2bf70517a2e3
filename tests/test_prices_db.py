"""The price database of an earlier release opens with this one (schema 2 adds the journal's new columns) and a
rollback to release 1 could still use it (readable_by 1)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from storelink.prices.db import ADDED_COLUMNS, SCHEMA, PriceDb
from storelink.system.schema import SCHEMAS


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
