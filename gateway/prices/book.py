"""The versioned price book: the single source of truth for every price charged or shown in the store.

`PriceBook` is registered as the gateway service ``"prices"``; till drivers answer a till's ``LOOKUP`` with
``lookup(code)``. While a batch is in transition (from the moment labels start to change until every affected
label has confirmed, and likewise while labels are put back after an abort) the answer for an affected SKU is
``min(old, new)`` with ``transition: true``: a shelf label may show either price during that window, and the
till must never charge more than the shelf shows.

The SQL helpers below run on the writer connection inside the caller's transaction (see PriceDb.write).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

from storelink.prices.db import PriceDb, get_meta, set_meta
from storelink.prices.models import BookItem

_LOOKUP_SQL = """
SELECT b.sku, b.gtin, b.price, b.unit_price, b.unit_basis, b.description, b.promotion,
  (SELECT MIN(MIN(COALESCE(c.old_price, c.new_price), COALESCE(c.new_price, c.old_price)))
     FROM changes c JOIN transitions t ON t.batch_id = c.batch_id WHERE c.sku = b.sku AND c.kind = 'change') AS floor
FROM book b WHERE b.{col} = ? LIMIT 1
"""
_BY_SKU = _LOOKUP_SQL.format(col="sku")
_BY_GTIN = _LOOKUP_SQL.format(col="gtin")
_ITEM_COLS = "sku, gtin, price, unit_price, unit_basis, description, promotion"
_DIFFERS = ("b.sku IS NULL OR b.price IS NOT s.price OR b.gtin IS NOT s.gtin OR b.unit_price IS NOT s.unit_price"
            " OR b.unit_basis IS NOT s.unit_basis OR b.description IS NOT s.description"
            " OR b.promotion IS NOT s.promotion")


# The floor comes from price changes only: an item added by a batch whose labels still print has one price (its
# own), and must not cap the price of a later version of it.


def row_to_item(row: tuple[Any, ...]) -> BookItem:
    return BookItem(sku=row[0], gtin=row[1], price=row[2], unit_price=row[3], unit_basis=row[4],
                    description=row[5], promotion=json.loads(row[6]) if row[6] else None)


class PriceBook:
    """Read side of the price book (lookups for tills, scanners, labels, the status page)."""

    def __init__(self, db: PriceDb, is_stale: Callable[[str], bool] | None = None,
                 held_back: Callable[[str], int | None] | None = None):
        self.db = db
        self._is_stale = is_stale or (lambda _device: False)
        self._held_back = held_back or (lambda _device: None)

    @property
    def active_version(self) -> int:
        """The version in force; 0 while none is (or the book is not open yet: devices start alongside it)."""
        if not self.db.is_open:
            return 0
        return int(get_meta(self.db.reader(), "active_version", "0") or 0)

    @property
    def currency(self) -> str | None:
        return get_meta(self.db.reader(), "currency")

    def lookup(self, code: str) -> dict[str, Any] | None:
        """The price to charge for a SKU (or GTIN), or None when the store does not sell it.

        A single indexed read on this thread's WAL read connection: it never waits for the writer.
        `price` already is min(old, new) when `transition` is true; `regular_price` is the book's own price.
        """
        conn = self.db.reader()
        row = conn.execute(_BY_SKU, (code,)).fetchone()
        if row is None and code.isdigit():
            row = conn.execute(_BY_GTIN, (code,)).fetchone()
            if row is None and len(code) < 14:
                row = conn.execute(_BY_GTIN, (code.zfill(14),)).fetchone()
        if row is None:
            return None
        floor = row[7]
        in_transition = floor is not None and floor < row[2]
        return {
            "sku": row[0], "gtin": row[1],
            "price": min(row[2], floor) if floor is not None else row[2],
            "regular_price": row[2],
            "currency": get_meta(conn, "currency"),
            "version": int(get_meta(conn, "active_version", "0") or 0),
            "description": row[5], "unit_price": row[3], "unit_basis": row[4],
            "promotion": json.loads(row[6]) if row[6] else None,
            "transition": floor is not None,
            "lowered": in_transition,
        }

    async def alookup(self, code: str) -> dict[str, Any] | None:
        """lookup() from a worker thread, for callers that prefer not to touch SQLite on the loop."""
        return await self.db.read(lambda _conn: self.lookup(code))

    def is_stale(self, device_id: str) -> bool:
        """True while a till is behind the active version: it must not sell until brought up to date."""
        return self._is_stale(device_id)

    def version_for(self, device_id: str) -> int:
        """The version a till should run now: the active one, or an older one while the till's COMMIT is held
        back (a protocol-1 till is committed to a price increase only once the labels show it)."""
        held = self._held_back(device_id)
        return held if held is not None else self.active_version

    def iter_items(self, batch: int = 2000) -> Iterator[BookItem]:
        """Every item in force, in SKU order (for POS price files and devices catching up)."""
        conn = self.db.reader()
        last = ""
        while True:
            rows = conn.execute(f"SELECT {_ITEM_COLS} FROM book WHERE sku > ? ORDER BY sku LIMIT ?",
                                (last, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                yield row_to_item(row)
            last = rows[-1][0]

    def count(self) -> int:
        return int(self.db.reader().execute("SELECT COUNT(*) FROM book").fetchone()[0])


# -- writer-side SQL (inside PriceDb.write transactions) ---------------------------------------------------
def compute_changes(conn: sqlite3.Connection, batch_id: str, full: bool, queued_before: list[str]) -> int:
    """Fill `changes` with the batch's diff against the book as it will be when the batch takes effect: the book
    with the batches `queued_before` it (decided, scheduled earlier) applied in order. Returns the SKUs changing."""
    base = "book"
    if queued_before:
        base = "temp.base"
        conn.execute("DROP TABLE IF EXISTS temp.base")
        conn.execute(f"CREATE TEMP TABLE base AS SELECT {_ITEM_COLS} FROM book")
        conn.execute("CREATE UNIQUE INDEX temp.base_sku ON base(sku)")
        for earlier in queued_before:
            _apply_changes(conn, earlier, base)
    conn.execute("DELETE FROM changes WHERE batch_id=?", (batch_id,))
    conn.execute(
        f"INSERT INTO changes(batch_id, sku, old_price, new_price, kind) "
        f"SELECT s.batch_id, s.sku, b.price, s.price, CASE WHEN b.sku IS NULL THEN 'add' ELSE 'change' END "
        f"FROM staged s LEFT JOIN {base} b ON b.sku = s.sku WHERE s.batch_id = ? AND ({_DIFFERS})", (batch_id,))
    if full:
        conn.execute(
            "INSERT INTO changes(batch_id, sku, old_price, new_price, kind) "
            f"SELECT ?, b.sku, b.price, NULL, 'remove' FROM {base} b "
            "WHERE NOT EXISTS (SELECT 1 FROM staged s WHERE s.batch_id = ? AND s.sku = b.sku)",
            (batch_id, batch_id))
    if queued_before:
        conn.execute("DROP TABLE temp.base")
    return int(conn.execute("SELECT COUNT(*) FROM changes WHERE batch_id=?", (batch_id,)).fetchone()[0])


def transition_prices(conn: sqlite3.Connection, batch_id: str) -> dict[str, int]:
    """SKU -> min(old, new) of a batch's price changes: the most a till may charge while the labels change. Items
    added, removed or with the same price need no hold (a till charges at most their one price anyway)."""
    return {r[0]: r[1] for r in conn.execute(
        "SELECT sku, MIN(old_price, new_price) FROM changes WHERE batch_id=? AND kind='change' "
        "AND old_price != new_price", (batch_id,))}


def raises_prices(conn: sqlite3.Connection, batch_id: str) -> bool:
    """Whether the batch charges more for some item than before (a till without holds must then wait)."""
    return conn.execute("SELECT 1 FROM changes WHERE batch_id=? AND old_price IS NOT NULL AND new_price > old_price "
                        "LIMIT 1", (batch_id,)).fetchone() is not None


def changed_items(conn: sqlite3.Connection, batch_id: str) -> tuple[list[BookItem], list[str]]:
    """(new content of added/changed SKUs, removed SKUs) for a batch."""
    rows = conn.execute(
        f"SELECT {', '.join('s.' + c for c in _ITEM_COLS.split(', '))} FROM changes c "
        "JOIN staged s ON s.batch_id = c.batch_id AND s.sku = c.sku WHERE c.batch_id = ? AND c.kind != 'remove' "
        "ORDER BY c.sku", (batch_id,)).fetchall()
    removed = [r[0] for r in conn.execute(
        "SELECT sku FROM changes WHERE batch_id = ? AND kind = 'remove' ORDER BY sku", (batch_id,))]
    return [row_to_item(r) for r in rows], removed


def begin_transition(conn: sqlite3.Connection, batch_id: str, now: float) -> None:
    conn.execute("INSERT OR IGNORE INTO transitions(batch_id, outcome, since) VALUES(?, 'pending', ?)",
                 (batch_id, now))


def end_transition(conn: sqlite3.Connection, batch_id: str) -> None:
    conn.execute("DELETE FROM transitions WHERE batch_id=?", (batch_id,))
    conn.execute("DELETE FROM changes WHERE batch_id=?", (batch_id,))


def settle_skus(conn: sqlite3.Connection, batch_id: str, skus: list[str], committed: bool) -> int:
    """The labels of `skus` show the batch's outcome: lookups stop answering min(old, new) for them. When the
    batch was committed, older transitions of the same SKUs end too (the shelf shows the book's content now).
    The batch's transition ends when no SKU is left (an older one emptied here ends on its next check); returns
    how many are left."""
    if skus:
        version = conn.execute("SELECT version FROM batches WHERE batch_id=?", (batch_id,)).fetchone()[0]
        conn.executemany("DELETE FROM changes WHERE batch_id=? AND sku=?", [(batch_id, s) for s in skus])
        if committed:
            conn.executemany(
                "DELETE FROM changes WHERE sku=? AND batch_id IN (SELECT t.batch_id FROM transitions t JOIN "
                "batches b ON b.batch_id=t.batch_id WHERE b.version < ? AND t.outcome IN ('committed','drift'))",
                [(s, version) for s in skus])
    left = int(conn.execute("SELECT COUNT(*) FROM changes WHERE batch_id=?", (batch_id,)).fetchone()[0])
    if left == 0:
        conn.execute("DELETE FROM transitions WHERE batch_id=?", (batch_id,))
    return left


def _apply_changes(conn: sqlite3.Connection, batch_id: str, table: str) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO {table}({_ITEM_COLS}) SELECT {', '.join('s.' + c for c in _ITEM_COLS.split(', '))} "
        "FROM changes c JOIN staged s ON s.batch_id = c.batch_id AND s.sku = c.sku "
        "WHERE c.batch_id = ? AND c.kind != 'remove'", (batch_id,))
    conn.execute(f"DELETE FROM {table} WHERE sku IN (SELECT sku FROM changes WHERE batch_id = ? AND kind = 'remove')",
                 (batch_id,))


def apply_batch(conn: sqlite3.Connection, batch_id: str, version: int, currency: str) -> None:
    """Switch the book to the batch's content (the commit point for lookups)."""
    _apply_changes(conn, batch_id, "book")
    set_meta(conn, "active_version", version)
    set_meta(conn, "active_batch", batch_id)
    set_meta(conn, "currency", currency)
    conn.execute("UPDATE transitions SET outcome='committed' WHERE batch_id=?", (batch_id,))
