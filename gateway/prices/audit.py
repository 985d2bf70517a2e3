"""Keeping devices honest between batches: stale tills are brought up to date, drift is reported.

- Every ``stale_check`` seconds each till's reported version is compared with the one it should run (the book's,
  or an older one while its COMMIT is held back); a till that is behind (it was offline during a batch, or missed
  a COMMIT) is marked stale — shown so in ``prices/state`` and by ``PriceBook.is_stale`` — and, once it is
  reachable, sent the whole active book (PREPARE + COMMIT), capped at min(old, new) for the items whose labels
  are still changing (a till without holds waits until they show the new prices), and every scheduled batch
  already prepared for the others.
- Every ``audit_interval`` seconds the reconciliation audit asks every target for its version (and an ESL
  driver for each tag's content hash, when it offers ``tag_states()``) and reports any drift to head office
  as a ``price.drift`` event whenever the set of drifting devices changes (together with the labels the settler
  found past their deadline).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from storelink.drivers.base import TagStateReporting, TillPriceTarget
from storelink.prices.book import PriceBook
from storelink.prices.coordinator import Coordinator
from storelink.prices.db import PriceDb, get_meta
from storelink.prices.models import Change, PricesConfig
from storelink.prices.schedule import Scheduler

log = logging.getLogger(__name__)
Emit = Callable[[str, dict[str, Any]], Awaitable[Any]]


class Auditor:
    def __init__(self, db: PriceDb, cfg: PricesConfig, book: PriceBook, coordinator: Coordinator,
                 scheduler: Scheduler, emit: Emit, on_change: Callable[[], None]):
        self.db = db
        self.cfg = cfg
        self.book = book
        self.coord = coordinator
        self.scheduler = scheduler
        self.emit = emit
        self.on_change = on_change
        self.stale: set[str] = set()  # mirror of devices.stale, read by PriceBook.is_stale on the loop
        self.drift: dict[str, str] = {}  # device -> problem: the audit's findings and labels past their deadline
        self._audit_drift: dict[str, str] = {}
        self._label_drift: dict[str, str] = {}
        self._reported_drift: frozenset[str] = frozenset()
        self.last_audit: float | None = None

    def is_stale(self, device: str) -> bool:
        return device in self.stale

    async def load(self) -> None:
        rows = await self.db.read(lambda c: c.execute("SELECT device FROM devices WHERE stale=1").fetchall())
        self.stale = {r[0] for r in rows}

    async def run(self) -> None:
        await self.load()
        next_audit = time.monotonic() + min(self.cfg.audit_interval, 30.0)
        while True:
            await asyncio.sleep(self.cfg.stale_check)
            try:
                await self.check_tills()
                if time.monotonic() >= next_audit:
                    await self.audit()
                    next_audit = time.monotonic() + self.cfg.audit_interval
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("price audit failed; trying again later")

    # -- stale tills --------------------------------------------------------------------------------------
    async def check_tills(self) -> None:
        if self.coord.lock.locked() or self.scheduler.lock.locked():
            return  # a batch is being prepared or switched: versions are in motion
        busy = await self.db.read(lambda c: {r[0] for r in c.execute(
            "SELECT t.device FROM targets t JOIN batches b ON b.batch_id=t.batch_id "
            "WHERE b.phase IN ('preparing','committed','aborting') AND t.state NOT IN ('excluded','stale')")})
        for t in self.coord.targets.all():
            if t.role != "till" or not t.online or t.device in busy:
                continue
            drv = self.coord.targets.driver(t.device)
            if drv is None:
                continue
            try:
                reported = await drv.price_reported_version()
            except Exception as err:
                log.debug("till %s: no version (%s)", t.device, err)
                continue
            expected = self.book.version_for(t.device)
            behind = expected > 0 and reported != expected
            if behind or t.device in self.stale:
                await self.catch_up(t.device, reported, self.book.active_version)

    async def catch_up(self, device: str, reported: int | None, active: int) -> None:
        if reported == active or active == 0:
            await self._set_stale(device, False, reported)
            return
        await self._set_stale(device, True, reported)
        async with self.coord.lock:
            drv = self.coord.targets.till(device)
            if drv is None or self.book.active_version != active:
                return
            can_hold = bool(drv.price_can_hold)
            items, caps, raising, batch_id = await self.db.read(self._whole_book)
            if raising and not can_hold:
                log.info("till %s keeps no holds and labels still show old prices for an increase: it is brought "
                         "up to date once they show the new ones", device, extra={"device": device})
                return
            change = Change(version=active, batch_id=batch_id, currency=self.book.currency or "", changed=items,
                            full=True, transition_prices=caps if can_hold else {})
            log.info("till %s is at version %s, the book at %d: sending the whole book (%d items, %d held)", device,
                     reported, active, len(items), len(change.transition_prices), extra={"device": device})
            try:
                await drv.price_prepare(change)
                await drv.price_commit(active)
                if change.transition_prices:  # its FINAL comes once the labels of every open transition show
                    await self._register(batch_id, device, "committed", 2, held=True, catchup=True)
                await self._prepare_queued(device, drv)
            except Exception as err:
                log.warning("till %s: catch-up to version %d failed: %s", device, active, err,
                            extra={"device": device})
                return
        await self._set_stale(device, False, active)
        await self.emit("price.caught_up", {"device": device, "from_version": reported, "version": active})

    def _whole_book(self, conn: Any) -> tuple[list[Any], dict[str, int], bool, str]:
        items = list(self.book.iter_items())
        caps = {r[0]: r[1] for r in conn.execute(  # as book.transition_prices, over every open transition
            "SELECT c.sku, MIN(MIN(c.old_price, c.new_price)) FROM changes c JOIN transitions t "
            "ON t.batch_id=c.batch_id WHERE c.kind='change' AND c.old_price != c.new_price GROUP BY c.sku")}
        raising = conn.execute(
            "SELECT 1 FROM changes c JOIN transitions t ON t.batch_id=c.batch_id WHERE t.outcome != 'drift' "
            "AND c.old_price IS NOT NULL AND c.new_price > c.old_price LIMIT 1").fetchone() is not None
        return items, caps, raising, str(get_meta(conn, "active_batch", ""))

    async def _prepare_queued(self, device: str, drv: TillPriceTarget) -> None:
        """Stage the scheduled batches the other tills already hold, so this one switches with them."""
        async with self.scheduler.lock:
            for b in await self.coord.journal.batches("phase='commit_decided'"):
                await drv.price_prepare(await self.coord.change_of(b))
                await self._register(b.batch_id, device, "prepared", 2 if drv.price_can_hold else 1)

    async def _register(self, batch_id: str, device: str, state: str, protocol: int, held: bool = False,
                        catchup: bool = False) -> None:
        await self.db.write(lambda c: c.execute(
            "INSERT INTO targets(batch_id, device, role, state, updated_at, protocol, held, catchup) "
            "VALUES(?, ?, 'till', ?, ?, ?, ?, ?) ON CONFLICT(batch_id, device) DO UPDATE SET state=excluded.state, "
            "error=NULL, updated_at=excluded.updated_at, protocol=excluded.protocol, held=excluded.held, "
            "catchup=excluded.catchup, final_left=NULL",
            (batch_id, device, state, time.time(), protocol, int(held), int(catchup))))

    async def _set_stale(self, device: str, stale: bool, version: int | None) -> None:
        if (device in self.stale) == stale and not stale:
            return
        if stale:
            self.stale.add(device)
        else:
            self.stale.discard(device)
        await self.db.write(lambda c: c.execute(
            "INSERT INTO devices(device, role, version, stale, updated_at) VALUES(?, 'till', ?, ?, ?) "
            "ON CONFLICT(device) DO UPDATE SET version=excluded.version, stale=excluded.stale, "
            "updated_at=excluded.updated_at", (device, version, int(stale), time.time())))
        self.on_change()

    # -- reconciliation -----------------------------------------------------------------------------------
    async def audit(self) -> dict[str, str]:
        """Compare every device with the book; report drift when the set of drifting devices changed."""
        drift: dict[str, str] = {}
        took_part = await self.db.read(lambda c: dict(c.execute(
            "SELECT t.device, MAX(b.version) FROM targets t JOIN batches b ON b.batch_id=t.batch_id "
            "WHERE t.state='committed' GROUP BY t.device").fetchall()))
        in_transition = await self.db.read(lambda c: c.execute("SELECT COUNT(*) FROM transitions").fetchone()[0])
        for t in self.coord.targets.all():
            drv = self.coord.targets.driver(t.device)
            if drv is None:
                continue
            try:
                reported = await drv.price_reported_version()
            except Exception as err:
                drift[t.device] = f"cannot read its version: {err}"
                continue
            await self.db.write(lambda c, d=t.device, r=t.role, v=reported: c.execute(
                "INSERT INTO devices(device, role, version, updated_at) VALUES(?,?,?,?) ON CONFLICT(device) DO "
                "UPDATE SET version=excluded.version, updated_at=excluded.updated_at", (d, r, v, time.time())))
            expected = self.book.version_for(t.device) if t.role == "till" else took_part.get(t.device)
            if expected and reported != expected and not (t.role == "label" and in_transition):
                drift[t.device] = f"reports version {reported}, expected {expected}"
            if t.role == "label" and isinstance(drv, TagStateReporting):  # only ESL systems can be read back
                try:
                    tags = await drv.tag_states()
                except Exception as err:
                    drift.setdefault(t.device, f"cannot read tag states: {err}")
                    continue
                bad = [f"{x.get('sku')}@{x.get('mac')}" for x in tags if x.get("drift")]
                if bad:
                    drift[t.device] = f"{len(bad)} tag(s) show other content than confirmed: {', '.join(bad[:10])}"
        self._audit_drift = drift
        self.last_audit = time.time()
        await self._publish_drift()
        return self.drift

    async def set_label_drift(self, device: str, problem: str | None) -> None:
        """The settler's finding: labels of `device` past their deadline (None: they caught up)."""
        if problem is None:
            self._label_drift.pop(device, None)
        else:
            self._label_drift[device] = problem
        await self._publish_drift()

    async def _publish_drift(self) -> None:
        merged = dict(self._audit_drift)
        for device, problem in self._label_drift.items():
            merged[device] = f"{merged[device]}; {problem}" if device in merged else problem
        self.drift = merged
        key = frozenset(f"{d}:{why}" for d, why in merged.items())
        if key != self._reported_drift:
            self._reported_drift = key
            await self.emit("price.drift", {"active_version": self.book.active_version, "drifting": len(merged),
                                            "devices": [{"device": d, "problem": why} for d, why in merged.items()]})
        self.on_change()
