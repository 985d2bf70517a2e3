"""Price compliance: every sale line against the price head office published for that store and SKU.

The store's promise (docs/prices.md) is that a till never charges more than the shelf shows. From head office's
records, the price a store may legitimately charge for a SKU at time t is:

- before a change is in force (its `effective_at`, else when it was published): the old price;
- from then until the store reports that every label shows the new price (`price.confirmed` for that batch):
  min(old, new), which is what the store's price book answers while labels change; a store that never
  confirms (offline, aborted, rejected) stays there, so an old higher price is an overcharge for it;
- after the confirmation: the new price.

Clocks differ (the till's, the gateway's, head office's) and a batch takes a moment to reach a store, so a line is
allowed the highest legitimate price anywhere within ``grace`` seconds of its sale time. A line charged above
that is an overcharge. SKUs head office never published for the store are not judged (counted as unchecked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storelink.hq.db import Database


@dataclass(frozen=True, slots=True)
class BatchRef:
    batch_id: str
    version: int
    mode: str
    in_force_from: float
    confirmed_at: float | None


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: int  # the highest price the line may carry
    published: int  # the price in force at the sale's time (what the flyer and web shop say)
    version: int  # the batch version that set it


class PriceTimeline:
    """One store's published prices over time (the batches for it and its groups) and its confirmations."""

    def __init__(self, db: Database, store: str, groups: list[str], prices: dict[tuple[str, str], int | None]):
        marks = ",".join("?" * len(groups))
        group_clause = f" OR target_group IN ({marks})" if groups else ""
        confirmed = {b: at for b, at in db.query(
            "SELECT batch_id, confirmed_at FROM store_prices WHERE store_id = ? AND confirmed_at IS NOT NULL",
            (store,))}
        rows = db.query("SELECT batch_id, version, mode, coalesce(effective_at, published_at) FROM price_batches "
                        f"WHERE target_store = ?{group_clause} ORDER BY version DESC", (store, *groups))
        self.batches = [BatchRef(b, int(v), m, float(t), confirmed.get(b)) for b, v, m, t in rows]
        self.db = db
        self._prices = prices  # (batch_id, code) -> price, shared between timelines of one tracker pass

    def _price(self, batch: BatchRef, sku: str | None, gtin: str | None) -> int | None:
        for column, code in (("sku", sku), ("gtin", gtin)):
            if not code:
                continue
            key = (batch.batch_id, f"{column}:{code}")
            if key not in self._prices:
                rows = self.db.query(f"SELECT price FROM price_items WHERE batch_id = ? AND {column} = ? LIMIT 1",
                                     (batch.batch_id, code))
                self._prices[key] = int(rows[0][0]) if rows else None
            if self._prices[key] is not None:
                return self._prices[key]
        return None

    def _in_force(self, sku: str | None, gtin: str | None, t: float, below: int | None = None
                  ) -> tuple[int, BatchRef] | None:
        """The price set by the newest batch in force at t (and under version `below`), and that batch."""
        for b in self.batches:
            if b.in_force_from > t or (below is not None and b.version >= below):
                continue
            price = self._price(b, sku, gtin)
            if price is not None:
                return price, b
            if b.mode == "full":
                return None  # a full list without this SKU: not sold here (any more)
        return None

    def legit(self, sku: str | None, gtin: str | None, t: float) -> tuple[int, int, int] | None:
        """(what the store may charge at t, the published price at t, its version), or None if never published."""
        now = self._in_force(sku, gtin, t)
        if now is None:
            return None
        new, batch = now
        if batch.confirmed_at is not None and batch.confirmed_at <= t:
            return new, new, batch.version
        before = self._in_force(sku, gtin, t, below=batch.version)
        return (new if before is None else min(before[0], new)), new, batch.version

    def check(self, sku: str | None, gtin: str | None, t: float, grace: float) -> Verdict | None:
        at_t = self.legit(sku, gtin, t)
        if at_t is None:
            return None
        points = {t - grace, t + grace}
        for b in self.batches:
            for edge in (b.in_force_from, b.confirmed_at):
                if edge is not None and t - grace <= edge <= t + grace:
                    points.add(edge)
        allowed = max((v[0] for p in points if (v := self.legit(sku, gtin, p)) is not None), default=at_t[0])
        return Verdict(allowed=max(allowed, at_t[0]), published=at_t[1], version=at_t[2])


def sale_lines(data: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    lines = data.get("lines")
    if not isinstance(lines, list):
        return []
    return [(i, line) for i, line in enumerate(lines) if isinstance(line, dict)]
