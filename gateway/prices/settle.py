"""After the decision: labels are told, the transition ends item by item as the shelf shows the outcome, and the
tills are released, all from the journal (so it goes on after a restart, however long a device is away).

Every ``confirm_poll`` seconds the settler

1. delivers each label target's commit or abort (``targets.state``) to its driver, whatever its health: a label
   driver records it in its own database and puts the content on the shelf when its device answers again;
2. asks every label target whether it shows the outcome of each open transition (the new content after a
   commit, the old one after an abort: ``price_confirmed`` / ``price_restored``, one count in the driver's
   database), and now and then and at the deadline what it is known to show for each item
   (``price_label_states``): an item's transition ends once every label carrying it shows the outcome. Past the
   deadline (``label_deadline`` after a commit, ``abort_hold`` after an abort) the change completes without the
   stragglers: only items whose label is known to show the other price stay at min(old, new), listed as drift
   (``price.drift``, the status page), until their label catches up;
3. records per label device what it is known to display (``devices.shows``, shown in ``prices/state``);
4. sends FINAL to tills that hold the transition prices (keeping the stragglers held), and COMMIT to tills
   without holds whose COMMIT was held back for a price increase (in version order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from storelink.drivers.base import LabelProgress
from storelink.prices import book as bk
from storelink.prices.db import PriceDb
from storelink.prices.journal import BatchRow, Emit, Journal
from storelink.prices.models import PricesConfig
from storelink.prices.targets import Targets

log = logging.getLogger(__name__)
ReportDrift = Callable[[str, str | None], Awaitable[None]]
ITEMS_EVERY = 10.0  # seconds between item-by-item looks at a change whose labels are not all confirmed yet


class Settler:
    def __init__(self, db: PriceDb, cfg: PricesConfig, journal: Journal, targets: Targets, emit: Emit,
                 on_change: Callable[[], None], report_drift: ReportDrift):
        self.db = db
        self.cfg = cfg
        self.journal = journal
        self.targets = targets
        self.emit = emit
        self.on_change = on_change
        self.report_drift = report_drift
        self.wake = asyncio.Event()
        self.held_back: dict[str, int] = {}  # till -> the version it should run while a COMMIT is held back
        self._shown: dict[tuple[str, str], dict[str, str]] = {}  # (batch, device) -> last label states read
        self._summary: dict[str, dict[str, Any]] = {}  # device -> what it is known to show (as last written)
        self._drifting: dict[str, str] = {}  # device -> problem, as last reported
        self._failing: dict[tuple[str, str, str], str] = {}  # (batch, device, action) -> last error (logged once)
        self._looked: dict[str, float] = {}  # batch -> when its labels were last asked item by item (monotonic)
        # batch -> label device -> {"confirmed", "left", "total"} while its labels settle (the status page's view)
        self.label_progress: dict[str, dict[str, dict[str, Any]]] = {}

    async def run(self) -> None:
        await self._load_held_back()
        while True:
            self.wake.clear()
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("price settling failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.confirm_poll):
                    await self.wake.wait()

    async def round(self) -> None:
        await self._deliver_labels()
        summary: dict[str, dict[str, Any]] = {}
        drift: dict[str, list[str]] = {}
        for batch_id, outcome, deadline in await self.db.read(lambda c: c.execute(
                "SELECT batch_id, outcome, deadline FROM transitions WHERE outcome IN ('committed','aborted','drift') "
                "ORDER BY since").fetchall()):
            await self._settle(await self.journal.batch(batch_id), outcome, deadline, summary, drift)
        await self._report(drift)
        # what each label device shows is on record before a till acts on it (FINAL, a held-back COMMIT): a till
        # on the new price never comes with a price state that still says the labels are changing
        await self._write_summaries(summary)
        await self._release_tills()

    # -- 1. label commits and aborts ----------------------------------------------------------------------
    async def _deliver_labels(self) -> None:
        rows = await self.db.read(lambda c: c.execute(
            "SELECT t.batch_id, b.version, b.phase, t.device FROM targets t JOIN batches b ON b.batch_id=t.batch_id "
            "WHERE t.role='label' AND ((b.phase IN ('committed','done') AND b.labels_released IS NOT NULL "
            "AND t.state='prepared') OR (b.phase IN ('aborting','aborted') AND t.state IN "
            "('preparing','prepared','failed'))) ORDER BY b.version").fetchall())
        for batch_id, version, phase, device in rows:
            action = "commit" if phase in ("committed", "done") else "abort"
            drv = self.targets.instance(device)
            if drv is None:
                if not self.targets.configured(device):
                    log.warning("batch %s: label device %s was removed before it took the %s", batch_id, device,
                                action)
                    await self.journal.set_target(batch_id, device, "gone", f"{action} not delivered: removed")
                continue
            try:
                await (drv.price_commit(version) if action == "commit" else drv.price_abort(version))
            except Exception as err:
                self._not_yet(batch_id, device, action, err)
                continue
            self._failing.pop((batch_id, device, action), None)
            await self.journal.set_target(batch_id, device, "committed" if action == "commit" else "aborted")
            log.info("batch %s: %s delivered to %s", batch_id, action, device)
            self.on_change()

    def _not_yet(self, batch_id: str, device: str, action: str, err: Exception) -> None:
        """Log a delivery that failed once per distinct error (it is tried again every round)."""
        key, text = (batch_id, device, action), str(err) or type(err).__name__
        if self._failing.get(key) != text:
            self._failing[key] = text
            log.warning("batch %s: %s to %s not delivered yet (trying again until it is): %s", batch_id, action,
                        device, text)

    # -- 2. the transition, item by item ------------------------------------------------------------------
    async def _settle(self, b: BatchRow, outcome: str, deadline: float | None, summary: dict[str, dict[str, Any]],
                      drift: dict[str, list[str]]) -> None:
        committed = b.phase in ("committed", "done")
        labels = await self.journal.targets_of(b.batch_id, role="label")
        undelivered = [t.device for t in labels if t.state in ("preparing", "prepared", "failed")]
        for device in undelivered:
            summary.setdefault(device, {}).setdefault("undelivered", []).append(
                {"batch_id": b.batch_id, "version": b.version, "action": "commit" if committed else "abort"})
        if undelivered and (deadline is None or time.time() < deadline):
            return  # a label that has not taken the outcome yet cannot show it (past the deadline: what is known)
        want, other = ("new", "old") if committed else ("old", "new")
        past = outcome == "drift"
        overdue = not past and deadline is not None and time.time() >= deadline
        # cheap first: a device that confirms the whole version (one count in its database) needs no item list
        pending = [t for t in labels if not await self._all_shown(b, t.device, t.state == "gone", committed)]
        await self._note_progress(b, labels, pending, committed)
        if not pending:
            await self.db.write(bk.settle_skus, b.batch_id, await self._skus(b), committed)
            return await self._ended(b, outcome, [t.device for t in labels], committed, complete=True)
        now = time.monotonic()
        every = max(ITEMS_EVERY, (b.changed or 0) / 1000)  # a 100k-item change: every 100 s (a Pi's CPU)
        if not (past or overdue) and now < self._looked.setdefault(b.batch_id, now) + every:
            self._summarise(b, committed, summary, pending, None, want, past)
            return  # item by item only now and then while nothing is overdue
        self._looked[b.batch_id] = now
        skus = await self._skus(b)
        views = {t.device: await self._label_states(b, t.device, t.state == "gone") for t in pending}
        not_yet: set[str] = set()  # items some label is not known to show the outcome on
        opposite: set[str] = set()  # ... known to show the other price on
        for states in views.values():
            for sku, shows in states.items():
                if shows != want:
                    not_yet.add(sku)
                    if shows == other:
                        opposite.add(sku)
        settled = [s for s in skus if s not in not_yet]
        left = await self.db.write(bk.settle_skus, b.batch_id, settled, committed) if settled else len(skus)
        release: list[str] = []
        if left and overdue:
            release = sorted(not_yet - opposite)
            left = await self.db.write(self._to_drift, b.batch_id, release, committed)
            past = left > 0
            log.warning("batch %s: labels past their deadline; %d item(s) stay at min(old, new) where a label is "
                        "known to show the %s price, %d released", b.batch_id, left, other, len(release))
            if committed and left:  # the change is complete without them; they are drift from now on
                await self.db.write(self._shows_version, [t.device for t in labels], b.version)
                await self.emit("price.confirmed", {"batch_id": b.batch_id, "version": b.version, "complete": False,
                                                    "stragglers": left})
        if left == 0:
            return await self._ended(b, outcome, [t.device for t in labels], committed, complete=not release)
        still = (opposite if past else not_yet) & set(skus)
        self._summarise(b, committed, summary, pending, views, want, past)
        for device, states in views.items():
            mine = sorted(s for s in still if states.get(s, want) != want) if past else []
            if mine:
                drift.setdefault(device, []).append(
                    f"{len(mine)} label(s) of version {b.version} not known to show the {want} price after the "
                    f"deadline: {', '.join(mine[:10])}")

    async def _note_progress(self, b: BatchRow, labels: list[Any], pending: list[Any], committed: bool) -> None:
        """What the status page shows of each label device while the batch settles: confirmed or not, and (for a
        committed version, from a driver that counts them) how many of its labels are left."""
        progress = self.label_progress.setdefault(b.batch_id, {})
        waiting = {t.device for t in pending}
        for t in labels:
            entry: dict[str, Any] = {"confirmed": t.device not in waiting}
            drv = self.targets.instance(t.device)
            if committed and isinstance(drv, LabelProgress):
                try:
                    left, total = await drv.price_labels_left(b.version)
                    entry.update(left=0 if entry["confirmed"] else left, total=total)
                except Exception as err:  # the count is for the page only; settling goes on without it
                    log.debug("label %s: cannot count labels left: %s", t.device, err)
            if progress.get(t.device) != entry:
                progress[t.device] = entry
                self.on_change()

    async def _skus(self, b: BatchRow) -> list[str]:
        return await self.db.read(lambda c: [r[0] for r in c.execute("SELECT sku FROM changes WHERE batch_id=?",
                                                                     (b.batch_id,))])

    async def _all_shown(self, b: BatchRow, device: str, gone: bool, committed: bool) -> bool:
        drv = None if gone else self.targets.instance(device)
        if drv is None:
            return False
        try:
            return bool(await (drv.price_confirmed(b.version) if committed else drv.price_restored(b.version)))
        except Exception as err:
            log.debug("label %s: cannot say whether version %d shows: %s", device, b.version, err)
            return False

    def _summarise(self, b: BatchRow, committed: bool, summary: dict[str, dict[str, Any]], pending: list[Any],
                   views: dict[str, dict[str, str]] | None, want: str, past: bool) -> None:
        """Per device still changing: how many of the batch's items its labels show new / old / either (from the
        last item-by-item look)."""
        for t in pending:
            states = views[t.device] if views is not None else self._shown.get((b.batch_id, t.device), {})
            counts = {"new": 0, "old": 0, "unknown": 0}
            for shows in states.values():
                counts[shows] += 1
            summary.setdefault(t.device, {}).setdefault("batches", []).append(
                {"batch_id": b.batch_id, "version": b.version, "outcome": "committed" if committed else "aborted",
                 "shows": counts if states else None, "past_deadline": past})

    async def _ended(self, b: BatchRow, outcome: str, devices: list[str], committed: bool, complete: bool) -> None:
        for device in devices:
            self._shown.pop((b.batch_id, device), None)
        self._looked.pop(b.batch_id, None)
        self.label_progress.pop(b.batch_id, None)
        log.info("batch %s: every label shows the %s prices; lookups answer the book's price again",
                 b.batch_id, "new" if committed else "old")
        if committed and outcome != "drift":  # (after drift, price.confirmed went out at the deadline)
            await self.db.write(self._shows_version, devices, b.version)
            await self.emit("price.confirmed", {"batch_id": b.batch_id, "version": b.version,
                                                "complete": complete, "stragglers": 0})
        self.on_change()

    @staticmethod
    def _shows_version(conn: Any, devices: list[str], version: int) -> None:
        for device in devices:
            conn.execute("INSERT INTO devices(device, role, version, updated_at) VALUES(?, 'label', ?, ?) "
                         "ON CONFLICT(device) DO UPDATE SET updated_at=excluded.updated_at, "
                         "version=MAX(COALESCE(devices.version, 0), excluded.version)", (device, version, time.time()))

    def _to_drift(self, conn: Any, batch_id: str, release: list[str], committed: bool) -> int:
        left = bk.settle_skus(conn, batch_id, release, committed)
        if left:
            conn.execute("UPDATE transitions SET outcome='drift' WHERE batch_id=?", (batch_id,))
        return left

    async def _label_states(self, b: BatchRow, device: str, gone: bool) -> dict[str, str]:
        """What `device` shows for `b`'s items; the last answer when it cannot say now, nothing known when gone."""
        key = (b.batch_id, device)
        drv = None if gone else self.targets.instance(device)
        if drv is not None:
            try:
                self._shown[key] = dict(await drv.price_label_states(b.version))
            except Exception as err:
                log.debug("label %s: no states for version %d: %s", device, b.version, err)
        if gone:
            return {sku: "unknown" for sku in self._shown.get(key, {})}
        return self._shown.get(key, {})

    async def _report(self, drift: dict[str, list[str]]) -> None:
        """Drift: per device, the items still not showing the outcome after the deadline (cleared once they do)."""
        found = {device: "; ".join(problems) for device, problems in drift.items()}
        for device in set(found) | set(self._drifting):
            problem = found.get(device)
            if self._drifting.get(device) != problem:
                if problem is None:
                    self._drifting.pop(device, None)
                else:
                    self._drifting[device] = problem
                await self.report_drift(device, problem)

    # -- 3. what each label device is known to show --------------------------------------------------------
    async def _write_summaries(self, summary: dict[str, dict[str, Any]]) -> None:
        devices = [t.device for t in self.targets.all() if t.role == "label"]
        changed = {d: summary.get(d, {}) for d in devices if self._summary.get(d) != summary.get(d, {})}
        if not changed:
            return
        now = time.time()

        def txn(conn: Any) -> None:
            for device, shows in changed.items():
                conn.execute("INSERT INTO devices(device, role, shows, updated_at) VALUES(?, 'label', ?, ?) "
                             "ON CONFLICT(device) DO UPDATE SET shows=excluded.shows, updated_at=excluded.updated_at",
                             (device, json.dumps(shows) if shows else None, now))

        await self.db.write(txn)
        self._summary.update(changed)
        self.on_change()

    # -- 4. tills: FINAL, and COMMITs held back --------------------------------------------------------------
    async def _release_tills(self) -> None:
        open_ = await self.db.read(lambda c: dict(c.execute("SELECT batch_id, outcome FROM transitions").fetchall()))
        rows = await self.db.read(lambda c: c.execute(
            "SELECT t.batch_id, b.version, t.device, t.final_left, t.catchup FROM targets t JOIN batches b "
            "ON b.batch_id=t.batch_id WHERE t.role='till' AND t.held=1 AND t.state!='gone' "
            "AND b.phase IN ('done','aborted') AND (t.final_left IS NULL OR t.final_left > 0) "
            "ORDER BY b.version").fetchall())
        for batch_id, version, device, final_left, catchup in rows:
            if open_.get(batch_id) not in (None, "drift"):
                continue  # labels still changing
            if catchup and await self.db.read(lambda c, v=version: c.execute(
                    "SELECT 1 FROM transitions t JOIN batches b ON b.batch_id=t.batch_id WHERE b.version <= ? "
                    "AND t.outcome != 'drift' LIMIT 1", (v,)).fetchone()):
                continue  # a till caught up during open transitions holds them all: wait for each
            keep = await self.db.read(self._keep, batch_id, version, bool(catchup))
            if final_left is not None and final_left == len(keep):
                continue
            drv = self.targets.holding(device)
            if drv is None:
                await self._gone(batch_id, device, "FINAL")
                continue  # away (or now without holds): the holds stay until it is back
            try:
                await drv.price_final(version, keep)
            except Exception as err:
                self._not_yet(batch_id, device, "FINAL", err)
                continue
            await self.journal.set_cols(batch_id, device, final_left=len(keep))
            log.info("batch %s: FINAL to %s (%d item(s) still held)", batch_id, device, len(keep))
        await self._deferred_commits(open_)

    async def _gone(self, batch_id: str, device: str, what: str) -> None:
        if not self.targets.configured(device):
            log.warning("batch %s: till %s was removed before it took its %s", batch_id, device, what)
            await self.journal.set_target(batch_id, device, "gone", f"{what} not delivered: removed")

    @staticmethod
    def _keep(conn: Any, batch_id: str, version: int, catchup: bool) -> list[str]:
        if not catchup:
            return [r[0] for r in conn.execute("SELECT sku FROM changes WHERE batch_id=? ORDER BY sku", (batch_id,))]
        # a till caught up during open transitions holds all of them under the active version
        return [r[0] for r in conn.execute(
            "SELECT DISTINCT c.sku FROM changes c JOIN transitions t ON t.batch_id=c.batch_id JOIN batches b "
            "ON b.batch_id=c.batch_id WHERE b.version <= ? ORDER BY c.sku", (version,))]

    async def _deferred_commits(self, open_: dict[str, str]) -> None:
        rows = await self.db.read(lambda c: c.execute(
            "SELECT t.batch_id, t.device FROM targets t JOIN batches b ON b.batch_id=t.batch_id "
            "WHERE t.state='deferred' ORDER BY b.version").fetchall())
        first: dict[str, str] = {}
        for batch_id, device in rows:
            first.setdefault(device, batch_id)  # in version order: a later COMMIT never overtakes an earlier one
        for device, batch_id in first.items():
            if open_.get(batch_id) not in (None, "drift"):
                continue
            drv = self.targets.till(device)
            if drv is None:
                await self._gone(batch_id, device, "COMMIT")
                continue
            b = await self.journal.batch(batch_id)
            try:
                await drv.price_commit(b.version)
            except Exception as err:
                self._not_yet(batch_id, device, "COMMIT", err)
                continue
            await self.journal.record_tills(b, [device], "committed", committed=True)
            log.info("batch %s: the labels show the increase; COMMIT delivered to %s", batch_id, device)
        if rows:
            await self._load_held_back()

    async def _load_held_back(self) -> None:
        # the version such a till last took (devices.version is written on every COMMIT and catch-up)
        rows = await self.db.read(lambda c: c.execute(
            "SELECT DISTINCT t.device, COALESCE(d.version, 0) FROM targets t LEFT JOIN devices d ON d.device=t.device "
            "WHERE t.state='deferred'").fetchall())
        self.held_back = {device: int(v) for device, v in rows}
        self.on_change()
