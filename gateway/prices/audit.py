"""Keeping devices honest between batches: stale tills are brought up to date, drift is reported.

- Every ``stale_check`` seconds each till's reported version is compared with the book's; a till that is behind
  (it was offline during a batch, or missed a COMMIT) is marked stale — shown so in ``prices/state`` and by
  ``PriceBook.is_stale`` — and, once it is reachable, sent the whole active book (PREPARE + COMMIT).
- Every ``audit_interval`` seconds the reconciliation audit asks every target for its version (and an ESL
  driver for each tag's content hash, when it offers ``tag_states()``) and reports any drift to head office
  as a ``price.drift`` event whenever the set of drifting devices changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from storelink.drivers.base import TagStateReporting
from storelink.prices.book import PriceBook
from storelink.prices.coordinator import Coordinator
from storelink.prices.db import PriceDb, get_meta
from storelink.prices.models import Change, PricesConfig

log = logging.getLogger(__name__)
Emit = Callable[[str, dict[str, Any]], Awaitable[Any]]


class Auditor:
    def __init__(self, db: PriceDb, cfg: PricesConfig, book: PriceBook, coordinator: Coordinator, emit: Emit,
                 on_change: Callable[[], None]):
        self.db = db
        self.cfg = cfg
        self.book = book
        self.coord = coordinator
        self.emit = emit
        self.on_change = on_change
        self.stale: set[str] = set()  # mirror of devices.stale, read by PriceBook.is_stale on the loop
        self.drift: dict[str, str] = {}
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
        if self.coord.lock.locked():
            return  # a batch is running: versions are in motion
        active = self.book.active_version
        for t in self.coord.targets.all():
            if t.role != "till" or not t.online:
                continue
            drv = self.coord.targets.driver(t.device)
            if drv is None:
                continue
            try:
                reported = await drv.price_reported_version()
            except Exception as err:
                log.debug("till %s: no version (%s)", t.device, err)
                continue
            behind = active > 0 and reported != active
            if behind or t.device in self.stale:
                await self.catch_up(t.device, reported, active)

    async def catch_up(self, device: str, reported: int | None, active: int) -> None:
        if reported == active or active == 0:
            await self._set_stale(device, False, reported)
            return
        await self._set_stale(device, True, reported)
        async with self.coord.lock:
            drv = self.coord.targets.driver(device)
            if drv is None or self.book.active_version != active:
                return
            items = await self.db.read(lambda _c: list(self.book.iter_items()))
            change = Change(version=active, batch_id=str(get_meta(self.db.reader(), "active_batch", "")),
                            currency=self.book.currency or "", changed=items, full=True)
            log.info("till %s is at version %s, the book at %d: sending the whole book (%d items)", device,
                     reported, active, len(items), extra={"device": device})
            try:
                await drv.price_prepare(change)
                await drv.price_commit(active)
            except Exception as err:
                log.warning("till %s: catch-up to version %d failed: %s", device, active, err,
                            extra={"device": device})
                return
        await self._set_stale(device, False, active)
        await self.emit("price.caught_up", {"device": device, "from_version": reported, "version": active})

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
        active = self.book.active_version
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
            expected = active if t.role == "till" else took_part.get(t.device)
            if expected and reported != expected and not (t.role == "label" and in_transition):
                drift[t.device] = f"reports version {reported}, expected {expected}"
            if t.role == "label" and isinstance(drv, TagStateReporting):
                try:
                    tags = await drv.tag_states()
                except Exception as err:
                    drift.setdefault(t.device, f"cannot read tag states: {err}")
                    continue
                bad = [f"{x.get('sku')}@{x.get('mac')}" for x in tags if x.get("drift")]
                if bad:
                    drift[t.device] = f"{len(bad)} tag(s) show other content than confirmed: {', '.join(bad[:10])}"
        self.drift = drift
        self.last_audit = time.time()
        key = frozenset(f"{d}:{why}" for d, why in drift.items())
        if key != self._reported_drift:
            self._reported_drift = key
            await self.emit("price.drift", {"active_version": active, "drifting": len(drift),
                                            "devices": [{"device": d, "problem": why} for d, why in drift.items()]})
        self.on_change()
        return drift
