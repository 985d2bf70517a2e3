"""The two-phase price coordinator with a durable journal: from a staged batch to the decision.

One batch at a time is prepared, each step recorded in SQLite (``batches.phase``, ``targets``, journal.py) before
the step it enables:

    staged -> preparing -> commit_decided  (every target prepared; schedule.py commits it at effective_at)
                       \\-> aborting -> aborted  (a target refused or missed the deadline, or a newer batch
                                                 takes effect before this scheduled one: superseded)

An immediate change starts its transition at ``preparing`` (lookups answer min(old, new) for the changed SKUs, in
the same transaction that records which devices take part). Tills prepare first: PREPARE, then HOLD for a till
that keeps holds, so every till charges at most min(old, new) before a single label changes; then the labels
render and push or print. A scheduled change (``effective_at`` later) is prepared ahead without a transition:
tills stage it, paper labels are printed ahead marked with their effective time, labels that cannot show a
valid-from wait for COMMIT. The lock is held while devices prepare, never while a decided batch waits.

After the decision schedule.py switches the book and COMMITs the tills, settle.py waits for the labels (and
delivers every label commit and abort, however long a device is away). On restart the journal is finished from
where it stands: a batch still ``preparing`` is prepared again (prepare is idempotent) within its original
deadline, a decided batch is committed or aborted everywhere.

Tills that are offline when a batch starts take no part: they are marked stale and brought up to the active
version (the whole book) when they return (see audit.py). Label systems cannot be skipped (what the shelf shows
is the point), so an offline label system makes the batch abort.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from storelink.drivers.base import PrepareFailed
from storelink.prices import book as bk
from storelink.prices.crashpoints import crash_point
from storelink.prices.db import PriceDb
from storelink.prices.journal import BatchRow, Emit, Journal
from storelink.prices.models import Change, PricesConfig
from storelink.prices.targets import Targets

log = logging.getLogger(__name__)


def release_memory() -> None:
    """Give the memory of a big batch back to the OS (a Pi has little): collect, then trim glibc's heap."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory is reused by the next batch instead


class Coordinator:
    def __init__(self, db: PriceDb, cfg: PricesConfig, targets: Targets, emit: Emit,
                 on_change: Callable[[], None], on_decided: Callable[[], None]):
        self.db = db
        self.cfg = cfg
        self.targets = targets
        self.emit = emit
        self.on_change = on_change
        self.on_decided = on_decided  # wakes the scheduler and the settler
        self.journal = Journal(db, targets, on_change)
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()  # one batch's preparation, one catch-up or one reprint touches devices at a time
        self.current: str | None = None

    # -- the main loop --------------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            batch_id = await self.db.read(lambda c: (c.execute(
                "SELECT batch_id FROM batches WHERE phase IN ('preparing','aborting') ORDER BY version LIMIT 1"
            ).fetchone() or c.execute(
                "SELECT batch_id FROM batches WHERE phase='staged' ORDER BY version DESC LIMIT 1").fetchone()))
            if batch_id is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                async with self.lock:
                    self.current = batch_id[0]
                    await self.drive(batch_id[0])
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug or a broken database must not spin: record it, report, wait, and the journal resumes.
                log.exception("price batch %s failed; retrying from its journal", batch_id[0])
                await asyncio.sleep(self.cfg.commit_retry)
            finally:
                self.current = None
                self.on_change()
                await asyncio.to_thread(release_memory)

    async def drive(self, batch_id: str) -> None:
        """Move one batch from wherever its journal stands to the decision (or through its abort)."""
        b = await self.journal.batch(batch_id)
        if b.phase == "staged":
            if await self._supersede_older(b):
                return  # the superseded batches are aborted first (lower versions), then this one starts
            crash_point("after_staging")
            b = await self._start_prepare(b)
        if b.phase == "preparing":
            failure = await self._prepare_all(b)
            if failure is None:
                await self.emit("price.prepared", {"batch_id": b.batch_id, "version": b.version,
                                                   "changed": b.changed,
                                                   "targets": [t.device for t in await self.journal.targets_of(
                                                       b.batch_id, ("prepared",))]})
                await self.journal.set_phase(b.batch_id, "commit_decided", decided_at=time.time())
                if b.scheduled:
                    log.info("batch %s: prepared; takes effect at %s", b.batch_id,
                             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.effective_at or 0)))
                self.on_decided()
                crash_point("after_decision")
                return
            await self.journal.set_phase(b.batch_id, "aborting", failure)
            b = await self.journal.batch(batch_id)
        if b.phase == "aborting":
            await self._abort(b)

    async def _abort(self, b: BatchRow) -> None:
        reason = await self.db.read(lambda c: c.execute("SELECT reason FROM batches WHERE batch_id=?",
                                                        (b.batch_id,)).fetchone()[0])
        tills = await self.journal.targets_of(b.batch_id, ("preparing", "prepared", "failed"), role="till")
        await self.journal.deliver_tills(b, tills, "abort", self.cfg.commit_retry,
                                         max(self.cfg.prepare_deadline, 30.0))

        def txn(conn: Any) -> None:
            # labels are told by the settler, which keeps trying until each one took it; the transition (an
            # immediate change's) stays open until they show the old prices again
            conn.execute("UPDATE transitions SET outcome='aborted', deadline=? WHERE batch_id=?",
                         (time.time() + self.cfg.abort_hold, b.batch_id))
            conn.execute("UPDATE batches SET phase='aborted', updated_at=? WHERE batch_id=?", (time.time(), b.batch_id))
            conn.execute("DELETE FROM staged WHERE batch_id=?", (b.batch_id,))

        await self.db.write(txn)
        self.on_change()
        await self.emit("price.aborted", {"batch_id": b.batch_id, "version": b.version, "reason": reason,
                                          "devices": await self.journal.device_states(b.batch_id)})
        self.on_decided()

    async def _supersede_older(self, b: BatchRow) -> bool:
        """Older staged batches are dropped; decided scheduled batches that this one takes effect before (or
        with) are aborted, since versions apply in order. True when some must be aborted first."""
        takes_effect = b.effective_at if b.effective_at is not None and b.effective_at > time.time() else 0.0
        older = await self.db.read(lambda c: [r[0] for r in c.execute(
            "SELECT batch_id FROM batches WHERE phase='staged' AND version < ?", (b.version,))])
        for bid in older:
            await self.journal.set_phase(bid, "superseded", f"superseded by version {b.version} before it started")
            await self.db.write(lambda c, bid=bid: c.execute("DELETE FROM staged WHERE batch_id=?", (bid,)))
            await self.emit("price.aborted", {"batch_id": bid, "reason": f"superseded by version {b.version}"})
        reason = f"superseded by version {b.version}, which takes effect before it"

        def txn(conn: Any) -> int:
            # a decided batch waiting for a later effective_at; the UPDATE's WHERE makes the scheduler's switch and
            # this decision exclusive (whichever commits first wins)
            return int(conn.execute(
                "UPDATE batches SET phase='aborting', reason=?, updated_at=? WHERE phase='commit_decided' "
                "AND version < ? AND effective_at IS NOT NULL AND effective_at > prepare_started "
                "AND effective_at >= ?", (reason, time.time(), b.version, takes_effect)).rowcount)

        n = await self.db.write(txn)
        if n:
            log.info("batch %s: %d scheduled batch(es) superseded", b.batch_id, n)
            self.on_change()
        return n > 0

    async def _start_prepare(self, b: BatchRow) -> BatchRow:
        infos = self.targets.all()
        now = time.time()
        immediate = b.effective_at is None or b.effective_at <= now
        protocols: dict[str, int | None] = {}
        for t in infos:
            till = self.targets.till(t.device) if t.role == "till" else None
            can_hold = till.price_can_hold if till is not None else None
            protocols[t.device] = None if can_hold is None else (2 if can_hold else 1)

        def txn(conn: Any) -> int:
            queued = conn.execute("SELECT batch_id, version FROM batches WHERE phase='commit_decided' AND version < ? "
                                  "ORDER BY version", (b.version,)).fetchall()
            changed = bk.compute_changes(conn, b.batch_id, b.mode == "full", [q[0] for q in queued])
            base = queued[-1][1] if queued else None
            if immediate:
                bk.begin_transition(conn, b.batch_id, now)
            for t in infos:
                state = "preparing" if t.online or t.role != "till" else "excluded"
                # held: an immediate change sends HOLD to a till with holds; journalled before it is sent, so the
                # till gets its FINAL whatever happens (FINAL to a till that holds nothing is harmless)
                held = int(immediate and state == "preparing" and (protocols.get(t.device) or 1) >= 2)
                conn.execute("INSERT OR REPLACE INTO targets(batch_id, device, role, state, error, updated_at, "
                             "protocol, held) VALUES(?,?,?,?,?,?,?,?)",
                             (b.batch_id, t.device, t.role, state,
                              None if state == "preparing" else "offline at prepare", now, protocols.get(t.device),
                              held))
                if state == "excluded":
                    conn.execute("INSERT INTO devices(device, role, stale, updated_at) VALUES(?,?,1,?) "
                                 "ON CONFLICT(device) DO UPDATE SET stale=1, updated_at=excluded.updated_at",
                                 (t.device, t.role, now))
            conn.execute("UPDATE batches SET phase='preparing', prepare_started=?, changed=?, base_version=?, "
                         "updated_at=? WHERE batch_id=?", (now, changed, base, now, b.batch_id))
            return changed

        changed = await self.db.write(txn)
        log.info("batch %s (version %d): %d SKU(s) change; preparing %d target(s)%s", b.batch_id, b.version,
                 changed, sum(1 for t in infos if t.online or t.role != "till"),
                 "" if immediate else " ahead of its effective_at")
        self.on_change()
        return await self.journal.batch(b.batch_id)

    async def change_of(self, b: BatchRow) -> Change:
        def read(conn: Any) -> Change:
            items, removed = bk.changed_items(conn, b.batch_id)
            return Change(version=b.version, batch_id=b.batch_id, currency=b.currency, changed=items, removed=removed,
                          transition_prices=bk.transition_prices(conn, b.batch_id),
                          effective_at=b.effective_at if b.scheduled else None)
        return await self.db.read(read)

    async def _prepare_all(self, b: BatchRow) -> str | None:
        """None when every taking-part target prepared before the deadline, else the reason to abort. Tills
        first (staged, and held for an immediate change), then labels: no label changes before every till
        charges at most min(old, new)."""
        rows = await self.journal.targets_of(b.batch_id, ("preparing", "prepared"))
        await asyncio.to_thread(release_memory)  # what staging a big batch left behind, before the Change is built
        change = await self.change_of(b)
        started = b.prepare_started or time.time()
        deadline = time.monotonic() + max(0.0, started + self.cfg.prepare_deadline - time.time())

        # Each driver turns the change into its own wire form (a till: one dict per item), so a 100k-item change
        # sent to ten tills at once would hold ten copies; bound the items being prepared at any moment.
        parallel = max(1, self.cfg.prepare_items_in_flight // max(1, len(change.changed)))
        gate = asyncio.Semaphore(parallel)

        async def one(device: str, role: str, protocol: int | None) -> None:
            drv = await self.targets.wait_driver(device, deadline)
            if drv is None:
                raise PrepareFailed(f"{device} is offline")
            async with gate:
                await drv.price_prepare(change)
            if role == "till" and not b.scheduled and (protocol or 1) >= 2:
                till = self.targets.holding(device)
                try:
                    if till is None:
                        raise ConnectionError("it went offline")
                    await till.price_hold(b.version)
                except Exception as err:
                    raise PrepareFailed(f"till {device} did not take HOLD {b.version}: {err}") from err
            await self.journal.set_target(b.batch_id, device, "prepared")
            crash_point("mid_prepare")

        failure: str | None = None
        for role in ("till", "label"):
            group = [r for r in rows if r.role == role]
            failure = await self._run_all(b, {r.device: one(r.device, r.role, r.protocol) for r in group}, deadline)
            if failure is not None:
                break
        if failure:
            log.warning("batch %s: aborting: %s", b.batch_id, failure)
        return failure

    async def _run_all(self, b: BatchRow, work: dict[str, Any], deadline: float) -> str | None:
        tasks = {asyncio.create_task(coro, name=f"prepare-{d}"): d for d, coro in work.items()}
        failure: str | None = None
        try:
            pending = set(tasks)
            while pending and failure is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    failure = "prepare deadline passed: " + ", ".join(sorted(tasks[t] for t in pending))
                    break
                done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    err = t.exception()
                    if err is not None:
                        text = str(err) or type(err).__name__
                        failure = text if tasks[t] in text else f"{tasks[t]}: {text}"
                        await self.journal.set_target(b.batch_id, tasks[t], "failed", str(err)[:300])
                        break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return failure
