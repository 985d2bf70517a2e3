"""Committing decided batches: at once, or at their ``effective_at`` by the store's (synchronised) clock.

The scheduler takes the decided batches in version order. It holds no lock while it waits, so newer batches
are staged and prepared meanwhile (several scheduled versions queue; one that takes effect before an earlier
scheduled one supersedes it, see coordinator.py) and stale tills are caught up. When a batch is due it is switched
in one transaction (``committed``: for a scheduled batch its transition starts here, so lookups answer
min(old, new) from effective_at on), and every prepared till is sent COMMIT: a till with holds charges min(old,
new) for the changed items until the labels show the new prices; a till without holds is sent COMMIT only when
the batch raises no price (else the settler sends it once the labels show the increase). Once every connected
till has taken its COMMIT (one that answers but fails is retried first; one that is away is stale when it is
back) the labels may change (``labels_released``: the settler pushes a scheduled batch's ESL content now). Then
``done``. A batch whose effective_at passed while the gateway was down is committed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from storelink.prices import book as bk
from storelink.prices.crashpoints import crash_point
from storelink.prices.db import PriceDb, set_meta
from storelink.prices.journal import BatchRow, Emit, Journal
from storelink.prices.models import PricesConfig

log = logging.getLogger(__name__)
MAX_NAP = 30.0  # re-read the wall clock at least this often while waiting (it may be stepped by NTP)


class Scheduler:
    def __init__(self, db: PriceDb, cfg: PricesConfig, journal: Journal, emit: Emit,
                 on_change: Callable[[], None], on_released: Callable[[], None]):
        self.db = db
        self.cfg = cfg
        self.journal = journal
        self.emit = emit
        self.on_change = on_change
        self.on_released = on_released  # wakes the settler: labels may change now
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()  # a batch's switch vs. a catch-up registering a till for queued batches

    async def run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("price scheduler failed; retrying from the journal")
                await asyncio.sleep(self.cfg.commit_retry)

    async def _step(self) -> None:
        self.wake.clear()
        rows = await self.journal.batches("phase IN ('commit_decided','committed')")
        if not rows:
            await self.wake.wait()
            return
        b = rows[0]  # versions apply in order
        if b.phase == "commit_decided" and b.effective_at is not None:
            wait = b.effective_at - time.time()
            if wait > 0:
                # asyncio sleeps on the monotonic clock; effective_at is wall time: nap, then look again
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait, MAX_NAP)):
                        await self.wake.wait()
                return
        await self.commit(b)

    async def commit(self, b: BatchRow) -> None:
        async with self.lock:
            if b.phase == "commit_decided":
                if not await self.db.write(self._switch, b):
                    return  # superseded meanwhile
                late = time.time() - b.effective_at if b.effective_at else 0.0
                log.info("batch %s: price book now at version %d%s", b.batch_id, b.version,
                         f" ({late:.3f} s after effective_at)" if b.effective_at else "")
                self.on_change()
            b = await self.journal.batch(b.batch_id)
            await self._commit_tills(b)
        timings = await self._timings(b.batch_id)
        await self.db.write(lambda c: c.execute("DELETE FROM staged WHERE batch_id=?", (b.batch_id,)))
        await self.emit("price.committed", {"batch_id": b.batch_id, "version": b.version, "changed": b.changed,
                                            "devices": await self.journal.device_states(b.batch_id),
                                            "timings": timings})

    def _switch(self, conn: Any, b: BatchRow) -> bool:
        row = conn.execute("SELECT phase FROM batches WHERE batch_id=?", (b.batch_id,)).fetchone()
        if row is None or row[0] != "commit_decided":
            return False
        now = time.time()
        bk.begin_transition(conn, b.batch_id, now)  # a scheduled change's transition starts now
        bk.apply_batch(conn, b.batch_id, b.version, b.currency)
        labels = conn.execute("SELECT 1 FROM targets WHERE batch_id=? AND role='label' AND state='prepared' LIMIT 1",
                              (b.batch_id,)).fetchone()
        if labels is None:
            bk.end_transition(conn, b.batch_id)  # no label to wait for: the new price is the shelf price
        else:
            conn.execute("UPDATE transitions SET deadline=? WHERE batch_id=?", (now + self.cfg.label_deadline,
                                                                                b.batch_id))
        conn.execute("UPDATE batches SET phase='committed', committed_at=?, updated_at=? WHERE batch_id=?",
                     (now, now, b.batch_id))
        set_meta(conn, "active_since", now)
        return True

    async def _commit_tills(self, b: BatchRow) -> None:
        rows = await self.journal.targets_of(b.batch_id, ("prepared",), role="till")
        raises = await self.db.read(bk.raises_prices, b.batch_id)
        # a till without holds behind another deferred COMMIT must not overtake it either
        deferred_elsewhere = await self.db.read(lambda c: {r[0] for r in c.execute(
            "SELECT t.device FROM targets t JOIN batches x ON x.batch_id=t.batch_id WHERE t.state='deferred' "
            "AND x.version < ?", (b.version,))})
        hold_back = [r for r in rows if (r.protocol or 1) < 2 and (raises or r.device in deferred_elsewhere)]
        for r in hold_back:
            log.info("batch %s: till %s keeps no holds; its COMMIT waits until the labels show the new prices",
                     b.batch_id, r.device)
            await self.journal.set_target(b.batch_id, r.device, "deferred")
        now_rows = [r for r in rows if r not in hold_back]

        async def release() -> None:
            if b.labels_released is None:
                await self.journal.set_phase(b.batch_id, "committed", labels_released=time.time())
            self.on_released()

        await self.journal.deliver_tills(b, now_rows, "commit", self.cfg.commit_retry,
                                         max(self.cfg.prepare_deadline, 30.0), when_reached=release,
                                         crash=lambda: crash_point("mid_commit"))
        if not now_rows:
            await release()
        await self.journal.set_phase(b.batch_id, "done")

    async def _timings(self, batch_id: str) -> dict[str, float | None]:
        """Seconds from the last chunk's arrival to the book switch and to every target committed."""
        row = await self.db.read(lambda c: c.execute(
            "SELECT last_chunk_at, staged_at, committed_at, updated_at FROM batches WHERE batch_id=?",
            (batch_id,)).fetchone())
        last, staged, committed, done = row

        def gap(a: float | None, b: float | None) -> float | None:
            return round(b - a, 3) if a and b else None

        return {"last_chunk_to_staged_s": gap(last, staged), "last_chunk_to_book_s": gap(last, committed),
                "last_chunk_to_committed_s": gap(last, done)}
