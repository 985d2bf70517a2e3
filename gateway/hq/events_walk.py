"""The tracker's ordered walk over each store's sales and price events (step 4 of storelink.hq.tracker).

A store's events are walked in `seq` order and only up to its first unsettled gap: a sale is judged once every
earlier event of the store has landed or been settled, so the `price.confirmed` that ended a change is always
known before the sales after it (the ingest workers may commit them in any order).
"""

from __future__ import annotations

import threading
from typing import Any

from storelink.hq import alerts
from storelink.hq.compliance import PriceTimeline, sale_lines
from storelink.hq.db import Database, loads
from storelink.hq.records import parse_ts

WALK_LIMIT = 5000  # events per store and pass
STORES_PER_COMMIT = 200
PRICE_COLUMNS = {"price.prepared": "prepared_at", "price.committed": "committed_at",
                 "price.confirmed": "confirmed_at", "price.aborted": "aborted_at", "price.rejected": "rejected_at"}


class EventWalker:
    def __init__(self, db: Database, *, grace: float):
        self.db = db
        self.grace = grace
        self.unchecked_lines = 0  # lines with a SKU head office never published for the store (or no price)
        self.stop: threading.Event | None = None  # the worker's shutdown: the walk ends between chunks

    def walk(self, now: float) -> set[str]:
        rows = self.db.query(
            "SELECT s.store_id, s.compliance_seq, s.checked_seq, s.group_list, (SELECT min(first_seq) FROM seq_gaps g "
            "WHERE g.store_id = s.store_id AND g.state = 'open') FROM stores s "
            "WHERE s.compliance_seq IS NOT NULL AND s.compliance_seq < s.checked_seq")
        prices: dict[tuple[str, str], int | None] = {}  # item prices, shared by the stores of this pass
        todo = []
        for store, done, checked, groups, first_open in rows:
            bound = checked if first_open is None else min(checked, first_open - 1)
            if bound > done:
                todo.append((store, done, bound, [g for g in (loads(groups) or []) if isinstance(g, str)]))
        for i in range(0, len(todo), STORES_PER_COMMIT):
            if self.stop is not None and self.stop.is_set():
                break
            with self.db.transaction():  # one commit per chunk of stores, not one per store
                for store, done, bound, group_list in todo[i:i + STORES_PER_COMMIT]:
                    self._walk_store(store, done, bound, group_list, prices, now)
        return {t[0] for t in todo}

    def _walk_store(self, store: str, done: int, bound: int, groups: list[str],
                    prices: dict[tuple[str, str], int | None], now: float) -> None:
        events = self.db.query(
            "SELECT seq, id, kind, device, ts, data FROM events WHERE store_id = ? AND seq > ? AND seq <= ? "
            "AND (kind = 'sale' OR kind LIKE 'price.%') ORDER BY seq LIMIT ?", (store, done, bound, WALK_LIMIT))
        timeline: PriceTimeline | None = None
        for seq, event_id, kind, device, ts, data in events:
            body = loads(data)
            if not isinstance(body, dict):
                continue
            if kind == "sale":
                timeline = timeline or PriceTimeline(self.db, store, groups, prices)
                self._check_sale(store, timeline, event_id, seq, device, ts, body, now)
            elif kind in PRICE_COLUMNS:
                self._price_event(store, kind, ts, body, now)
                timeline = None  # a confirmation changes what the next sale may charge
        last = events[-1][0] if len(events) == WALK_LIMIT else bound
        self.db.execute("UPDATE stores SET compliance_seq = ? WHERE store_id = ?", (last, store))

    def _price_event(self, store: str, kind: str, ts: float, data: dict[str, Any], now: float) -> None:
        batch_id = data.get("batch_id")
        if not isinstance(batch_id, str):
            return
        version = data.get("version") if isinstance(data.get("version"), int) else None
        reason = data.get("reason") if isinstance(data.get("reason"), str) else None
        column = PRICE_COLUMNS[kind]
        self.db.execute(
            f"INSERT INTO store_prices (store_id, batch_id, version, {column}, reason) VALUES (?, ?, ?, ?, ?) "
            f"ON CONFLICT (store_id, batch_id) DO UPDATE SET {column} = coalesce(store_prices.{column}, "
            f"excluded.{column}), version = coalesce(excluded.version, store_prices.version), "
            "reason = coalesce(excluded.reason, store_prices.reason)", (store, batch_id, version, ts, reason))
        if kind in ("price.rejected", "price.aborted"):
            what = "rejected" if kind == "price.rejected" else "aborted"
            detail = data.get("detail") if isinstance(data.get("detail"), str) else ""
            alerts.open_alert(self.db, store, f"price_{what}", batch_id,
                              f"price batch {batch_id} (version {version if version is not None else '?'}) {what} "
                              f"by the store: {reason or 'no reason given'}{': ' + detail if detail else ''}",
                              {"batch_id": batch_id, "version": version, "reason": reason, "detail": detail,
                               "at": ts}, now)

    def _check_sale(self, store: str, timeline: PriceTimeline, event_id: str, seq: int, device: str, ts: float,
                    sale: dict[str, Any], now: float) -> None:
        till = str(sale.get("till_id") or device)
        sale_id = str(sale.get("sale_id") or event_id)
        sold_at = parse_ts(sale.get("ts")) or ts
        currency = sale.get("currency") if isinstance(sale.get("currency"), str) else None
        for index, line in sale_lines(sale):
            charged = line.get("price")
            if not isinstance(charged, int) or isinstance(charged, bool):
                self.unchecked_lines += 1
                continue
            sku = str(line["sku"]) if line.get("sku") is not None else None
            gtin = str(line["gtin"]) if line.get("gtin") is not None else None
            verdict = timeline.check(sku, gtin, sold_at, self.grace)
            if verdict is None:
                self.unchecked_lines += 1
                continue
            if charged <= verdict.allowed:
                continue
            what = f"{sku}{' (' + str(line['description']) + ')' if line.get('description') else ''}"
            alerts.open_alert(
                self.db, store, "overcharge", f"{till}/{sale_id}/{index}",
                f"till {till} charged {alerts.money(charged, currency)} for {what} in sale {sale_id}; published "
                f"price {alerts.money(verdict.published, currency)} (version {verdict.version})",
                {"till": till, "sale_id": sale_id, "sku": sku, "gtin": gtin, "line": index, "charged": charged,
                 "published": verdict.published, "allowed": verdict.allowed, "version": verdict.version,
                 "qty": line.get("qty"), "currency": currency, "sold_at": sold_at, "event_id": event_id,
                 "seq": seq, "stale_prices": bool(sale.get("stale_prices"))}, now)
