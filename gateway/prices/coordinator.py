"""The two-phase price coordinator with a durable journal.

One batch at a time goes through these phases, each recorded in SQLite (``batches.phase``, ``targets``) before
the step it enables:

    staged -> preparing -> commit_decided -> committed -> done          (every target prepared)
                       \\-> aborting -> aborted                          (a target refused or missed the deadline)

``preparing`` starts the transition (lookups answer min(old, new) for the changed SKUs) in the same transaction
that records which devices take part; then every target prepares concurrently. ``commit_decided`` is the durable
decision; at ``effective_at`` (or at once) the price book switches in one transaction (``committed``) and COMMIT
is delivered to every till until it sticks. On restart the journal is finished from where it stands: a batch
still ``preparing`` is prepared again (prepare is idempotent) within its original deadline, a decided batch is
committed or aborted everywhere. So every device ends on the old version or every device on the new one.

Tills that are offline when a batch starts take no part: they are marked stale and brought up to the active
version (the whole book) when they return (see audit.py). Label systems cannot be skipped (what the shelf shows
is the point), so an offline label system makes the batch abort.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from storelink.drivers.base import LabelProgress, PrepareFailed, RestoreConfirming
from storelink.prices import book as bk
from storelink.prices.crashpoints import crash_point
from storelink.prices.db import PriceDb, set_meta
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


Emit = Callable[[str, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class BatchRow:
    batch_id: str
    version: int
    phase: str
    mode: str
    currency: str
    effective_at: float | None
    prepare_started: float | None
    changed: int | None


_COLS = "batch_id, version, phase, mode, currency, effective_at, prepare_started, changed"


class Coordinator:
    def __init__(self, db: PriceDb, cfg: PricesConfig, targets: Targets, emit: Emit,
                 on_change: Callable[[], None]):
        self.db = db
        self.cfg = cfg
        self.targets = targets
        self.emit = emit
        self.on_change = on_change
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()  # one batch or one catch-up touches devices at a time
        self.current: str | None = None
        self._followers: dict[str, asyncio.Task[None]] = {}
        # batch -> label device -> {"confirmed", "left", "total"} while its labels settle (for the status page)
        self.label_progress: dict[str, dict[str, dict[str, Any]]] = {}

    # -- journal access -------------------------------------------------------------------------------------
    async def _batch(self, batch_id: str) -> BatchRow:
        row = await self.db.read(lambda c: c.execute(f"SELECT {_COLS} FROM batches WHERE batch_id=?",
                                                     (batch_id,)).fetchone())
        return BatchRow(*row)

    async def _set_phase(self, batch_id: str, phase: str, reason: str | None = None, **cols: float) -> None:
        def txn(conn: Any) -> None:
            sets = "".join(f", {k}=?" for k in cols)
            conn.execute(f"UPDATE batches SET phase=?, reason=COALESCE(?, reason), updated_at=?{sets} "
                         "WHERE batch_id=?", (phase, reason, time.time(), *cols.values(), batch_id))
        await self.db.write(txn)
        self.on_change()

    async def _set_target(self, batch_id: str, device: str, state: str, error: str | None = None) -> None:
        await self.db.write(lambda c: c.execute(
            "UPDATE targets SET state=?, error=?, updated_at=? WHERE batch_id=? AND device=?",
            (state, error, time.time(), batch_id, device)))

    async def _targets_of(self, batch_id: str, states: tuple[str, ...]) -> list[tuple[str, str, str]]:
        q = (f"SELECT device, role, state FROM targets WHERE batch_id=? AND state IN ({','.join('?' * len(states))})"
             " ORDER BY device")
        return await self.db.read(lambda c: [tuple(r) for r in c.execute(q, (batch_id, *states))])

    async def _mark_stale(self, device: str, role: str, stale: bool) -> None:
        await self.db.write(lambda c: c.execute(
            "INSERT INTO devices(device, role, stale, updated_at) VALUES(?,?,?,?) ON CONFLICT(device) DO UPDATE "
            "SET stale=excluded.stale, updated_at=excluded.updated_at", (device, role, int(stale), time.time())))
        self.on_change()

    # -- the main loop --------------------------------------------------------------------------------------
    async def run(self) -> None:
        await self._resume_followers()
        while True:
            batch_id = await self.db.read(lambda c: (c.execute(
                "SELECT batch_id FROM batches WHERE phase IN ('preparing','commit_decided','committed','aborting') "
                "ORDER BY version LIMIT 1").fetchone() or c.execute(
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
        """Move one batch from wherever its journal stands to done or aborted."""
        b = await self._batch(batch_id)
        if b.phase == "staged":
            await self._supersede_older(b)
            crash_point("after_staging")
            b = await self._start_prepare(b)
        if b.phase == "preparing":
            failure = await self._prepare_all(b)
            if failure is None:
                await self.emit("price.prepared", {"batch_id": b.batch_id, "version": b.version,
                                                   "changed": b.changed,
                                                   "targets": [d for d, _r, _s in await self._targets_of(
                                                       b.batch_id, ("prepared",))]})
                await self._set_phase(b.batch_id, "commit_decided", decided_at=time.time())
                crash_point("after_decision")
            else:
                await self._set_phase(b.batch_id, "aborting", failure)
            b = await self._batch(batch_id)
        if b.phase == "commit_decided":
            if b.effective_at is not None and b.effective_at > time.time():
                log.info("batch %s: committing at effective_at (in %.0f s)", b.batch_id, b.effective_at - time.time())
                await asyncio.sleep(b.effective_at - time.time())
            await self._apply(b)
            b = await self._batch(batch_id)
        if b.phase == "committed":
            await self._commit_all(b)
            await self._set_phase(b.batch_id, "done")
            timings = await self._timings(b.batch_id)
            await self.db.write(lambda c: c.execute("DELETE FROM staged WHERE batch_id=?", (b.batch_id,)))
            await self.emit("price.committed", {"batch_id": b.batch_id, "version": b.version, "changed": b.changed,
                                                "devices": await self._device_states(b.batch_id),
                                                "timings": timings})
            self._follow(b.batch_id, b.version, committed=True)
        elif b.phase == "aborting":
            reason = await self.db.read(lambda c: c.execute("SELECT reason FROM batches WHERE batch_id=?",
                                                            (b.batch_id,)).fetchone()[0])
            await self._abort_all(b)
            await self._set_phase(b.batch_id, "aborted")
            await self.db.write(lambda c: c.execute("DELETE FROM staged WHERE batch_id=?", (b.batch_id,)))
            await self.emit("price.aborted", {"batch_id": b.batch_id, "version": b.version, "reason": reason,
                                              "devices": await self._device_states(b.batch_id)})
            self._follow(b.batch_id, b.version, committed=False)

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

    async def _supersede_older(self, b: BatchRow) -> None:
        older = await self.db.read(lambda c: [r[0] for r in c.execute(
            "SELECT batch_id FROM batches WHERE phase='staged' AND version < ?", (b.version,))])
        for bid in older:
            await self._set_phase(bid, "superseded", f"superseded by version {b.version} before it started")
            await self.db.write(lambda c, bid=bid: c.execute("DELETE FROM staged WHERE batch_id=?", (bid,)))
            await self.emit("price.aborted", {"batch_id": bid, "reason": f"superseded by version {b.version}"})

    async def _start_prepare(self, b: BatchRow) -> BatchRow:
        infos = self.targets.all()
        now = time.time()

        def txn(conn: Any) -> int:
            changed = bk.compute_changes(conn, b.batch_id, b.mode == "full")
            bk.begin_transition(conn, b.batch_id, now)
            for t in infos:
                state = "preparing" if t.online or t.role != "till" else "excluded"
                conn.execute("INSERT OR REPLACE INTO targets(batch_id, device, role, state, error, updated_at) "
                             "VALUES(?,?,?,?,?,?)", (b.batch_id, t.device, t.role, state,
                                                     None if state == "preparing" else "offline at prepare", now))
                if state == "excluded":
                    conn.execute("INSERT INTO devices(device, role, stale, updated_at) VALUES(?,?,1,?) "
                                 "ON CONFLICT(device) DO UPDATE SET stale=1, updated_at=excluded.updated_at",
                                 (t.device, t.role, now))
            conn.execute("UPDATE batches SET phase='preparing', prepare_started=?, changed=?, updated_at=? "
                         "WHERE batch_id=?", (now, changed, now, b.batch_id))
            return changed

        changed = await self.db.write(txn)
        log.info("batch %s (version %d): %d SKU(s) change; preparing %d target(s)", b.batch_id, b.version, changed,
                 sum(1 for t in infos if t.online or t.role != "till"))
        self.on_change()
        return await self._batch(b.batch_id)

    async def _change(self, b: BatchRow) -> Change:
        items, removed = await self.db.read(bk.changed_items, b.batch_id)
        return Change(version=b.version, batch_id=b.batch_id, currency=b.currency, changed=items, removed=removed)

    async def _prepare_all(self, b: BatchRow) -> str | None:
        """None when every taking-part target prepared before the deadline, else the reason to abort."""
        rows = await self._targets_of(b.batch_id, ("preparing", "prepared"))
        await asyncio.to_thread(release_memory)  # what staging a big batch left behind, before the Change is built
        change = await self._change(b)
        started = b.prepare_started or time.time()
        deadline_wall = started + self.cfg.prepare_deadline
        deadline = time.monotonic() + max(0.0, deadline_wall - time.time())

        # Each driver turns the change into its own wire form (a till: one dict per item), so a 100k-item change
        # sent to ten tills at once would hold ten copies; bound the items being prepared at any moment.
        parallel = max(1, self.cfg.prepare_items_in_flight // max(1, len(change.changed)))
        gate = asyncio.Semaphore(parallel)

        async def one(device: str) -> None:
            drv = await self.targets.wait_driver(device, deadline)
            if drv is None:
                raise PrepareFailed(f"{device} is offline")
            async with gate:
                await drv.price_prepare(change)
            await self._set_target(b.batch_id, device, "prepared")
            crash_point("mid_prepare")

        tasks = {asyncio.create_task(one(d), name=f"prepare-{d}"): d for d, _r, _s in rows}
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
                        await self._set_target(b.batch_id, tasks[t], "failed", str(err)[:300])
                        break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if failure:
            log.warning("batch %s: aborting: %s", b.batch_id, failure)
        return failure

    async def _apply(self, b: BatchRow) -> None:
        has_labels = bool(await self._targets_of(b.batch_id, ("prepared",)) and any(
            r == "label" for _d, r, _s in await self._targets_of(b.batch_id, ("prepared",))))

        def txn(conn: Any) -> None:
            bk.apply_batch(conn, b.batch_id, b.version, b.currency)
            if not has_labels:
                bk.end_transition(conn, b.batch_id)  # no label to wait for: the new price is the shelf price
            now = time.time()
            conn.execute("UPDATE batches SET phase='committed', committed_at=?, updated_at=? WHERE batch_id=?",
                         (now, now, b.batch_id))
            set_meta(conn, "active_since", now)

        await self.db.write(txn)
        log.info("batch %s: price book now at version %d", b.batch_id, b.version)
        self.on_change()

    async def _deliver(self, b: BatchRow, states: tuple[str, ...], done_state: str, action: str) -> None:
        """COMMIT or ABORT every target still in `states`, retrying until it sticks or the give-up time passes;
        a till that never took it is marked stale (the catch-up brings it to the active version later)."""
        give_up = time.monotonic() + max(self.cfg.prepare_deadline, 30.0)
        while True:
            rows = await self._targets_of(b.batch_id, states)
            if not rows:
                return

            async def one(device: str, role: str) -> bool:
                drv = self.targets.driver(device)
                if drv is None:
                    return False
                try:
                    if action == "commit":
                        await drv.price_commit(b.version)
                    else:
                        await drv.price_abort(b.version)
                except Exception as err:
                    log.info("batch %s: %s to %s failed (%s); retrying", b.batch_id, action.upper(), device, err)
                    return False
                return True

            # the first target alone (so a crash test can stop between the first and the rest), then the others
            # at once; their outcomes are journalled in one transaction
            first = [rows[0]] if await one(*rows[0][:2]) else []
            if first:
                await self._record_delivered(b, first, done_state, action)
                crash_point(f"mid_{action}")
            rest = rows[1:]
            results = await asyncio.gather(*(one(d, r) for d, r, _s in rest))
            await self._record_delivered(b, [row for row, ok in zip(rest, results, strict=True) if ok],
                                         done_state, action)
            if bool(first) and all(results):
                return
            if time.monotonic() > give_up:
                for device, role, _state in await self._targets_of(b.batch_id, states):
                    log.warning("batch %s: %s never reached %s; marking it stale", b.batch_id, action, device)
                    await self._set_target(b.batch_id, device, "stale", f"{action} not delivered")
                    await self._mark_stale(device, role, True)
                return
            await asyncio.sleep(self.cfg.commit_retry)

    async def _record_delivered(self, b: BatchRow, rows: list[tuple[str, str, str]], done_state: str,
                                action: str) -> None:
        if not rows:
            return
        now = time.time()

        def txn(conn: Any) -> None:
            for device, role, _s in rows:
                conn.execute("UPDATE targets SET state=?, error=NULL, updated_at=? WHERE batch_id=? AND device=?",
                             (done_state, now, b.batch_id, device))
                if action == "commit":
                    conn.execute(
                        "INSERT INTO devices(device, role, version, stale, updated_at) VALUES(?,?,?,0,?) "
                        "ON CONFLICT(device) DO UPDATE SET version=excluded.version, stale=0, "
                        "updated_at=excluded.updated_at", (device, role, b.version, now))

        await self.db.write(txn)
        self.on_change()

    async def _commit_all(self, b: BatchRow) -> None:
        await self._deliver(b, ("prepared",), "committed", "commit")

    async def _abort_all(self, b: BatchRow) -> None:
        await self._deliver(b, ("preparing", "prepared", "failed"), "aborted", "abort")

    async def _device_states(self, batch_id: str) -> dict[str, str]:
        return await self.db.read(lambda c: dict(c.execute("SELECT device, state FROM targets WHERE batch_id=?",
                                                           (batch_id,)).fetchall()))

    # -- after the decision: labels ---------------------------------------------------------------------------
    async def _resume_followers(self) -> None:
        rows = await self.db.read(lambda c: c.execute(
            "SELECT t.batch_id, b.version, t.outcome FROM transitions t JOIN batches b ON b.batch_id=t.batch_id "
            "WHERE t.outcome IN ('committed','aborted') OR b.phase IN ('done','aborted')").fetchall())
        for batch_id, version, outcome in rows:
            self._follow(batch_id, version, committed=outcome == "committed")

    async def _note_progress(self, progress: dict[str, dict[str, Any]], device: str, drv: Any,
                             version: int | None, confirmed: bool) -> None:
        """Keep what the status page shows of a label device while its labels confirm: confirmed or not, and how
        many labels are left (a driver with LabelProgress; only for a committed version)."""
        entry: dict[str, Any] = {"confirmed": confirmed}
        if version is not None and isinstance(drv, LabelProgress):
            try:
                left, total = await drv.price_labels_left(version)
                entry.update(left=0 if confirmed else left, total=total)
            except Exception as err:  # the count is for the page only; confirmation goes on without it
                log.debug("label %s: cannot count labels left: %s", device, err)
        if progress.get(device) != entry:
            progress[device] = entry
            self.on_change()

    def _follow(self, batch_id: str, version: int, committed: bool) -> None:
        if batch_id not in self._followers:
            task = asyncio.create_task(self._labels_settle(batch_id, version, committed), name=f"labels-{batch_id}")
            self._followers[batch_id] = task
            task.add_done_callback(lambda _t: self._followers.pop(batch_id, None))

    async def _labels_settle(self, batch_id: str, version: int, committed: bool) -> None:
        """Keep min(old, new) for the batch's SKUs until every label shows what the book says.

        Committed: until every label target confirms `version`. Aborted: until each label target confirms its
        old content is back (`price_restored(version)` when the driver offers it), else for `abort_hold`
        seconds, the time a tag needs to check in a few times or a person to swap a paper label."""
        await self.db.write(lambda c: c.execute("UPDATE transitions SET outcome=? WHERE batch_id=?",
                                                ("committed" if committed else "aborted", batch_id)))
        every = ("preparing", "prepared", "failed", "committed", "aborted", "stale")
        labels = [d for d, r, _s in await self._targets_of(batch_id, every) if r == "label"]
        log.info("batch %s: waiting for %s to confirm %s", batch_id, ", ".join(labels) or "no label",
                 "the new prices" if committed else "the old prices are back")
        since = time.monotonic()
        progress = self.label_progress.setdefault(batch_id, {d: {"confirmed": False} for d in labels})
        while labels:
            waiting = []
            for device in labels:
                drv = self.targets.driver(device)
                try:
                    if committed:
                        ok = drv is not None and bool(await drv.price_confirmed(version))
                    elif isinstance(drv, RestoreConfirming):
                        ok = bool(await drv.price_restored(version))
                    else:
                        ok = time.monotonic() - since >= self.cfg.abort_hold
                except Exception as err:
                    log.debug("label %s: cannot confirm version %d: %s", device, version, err)
                    ok = False
                if not ok:
                    waiting.append(device)
                await self._note_progress(progress, device, drv, version if committed else None, ok)
            if waiting != labels:
                log.debug("batch %s: labels still to confirm: %s", batch_id, ", ".join(waiting) or "none")
            labels = waiting
            if labels:
                await asyncio.sleep(self.cfg.confirm_poll)
        await self.db.write(bk.end_transition, batch_id)
        self.label_progress.pop(batch_id, None)
        log.info("batch %s: every label settled; lookups answer the book's price again", batch_id)
        if committed:
            await self.emit("price.confirmed", {"batch_id": batch_id, "version": version})
        self.on_change()
