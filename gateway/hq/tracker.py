"""The tracker: turns what the ingest workers landed into head office's view of each store.

Exactly one worker runs it at a time (it holds the database lock "tracker"; when that worker dies its connection
closes and the next worker to ask takes over). Each pass:

1. folds the newest retained states into `stores` (storelink.hq.summary);
2. follows each store's `seq`: new events past `checked_seq` are scanned for holes, which become *open* gaps;
   the store's `outbox.evicted` reports (seq ranges it evicted under its cap) are recorded;
3. settles gaps: seqs that arrived late fill them, reported evictions turn them into *evicted* (not an alarm);
   what is left once the store has had time to report its evictions becomes *missing*: a `seq_gap` alert with
   the seq range;
4. walks each store's sales and price events in seq order, up to the first unsettled gap (so a sale is judged
   only once every earlier event of its store, e.g. the `price.confirmed` before it, is known): price events
   update `store_prices`, sale lines are checked against the published prices (storelink.hq.compliance);
5. re-evaluates conditions and the problem flags of every store that changed (storelink.hq.summary).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from storelink.contract import EvictionReport
from storelink.hq import alerts
from storelink.hq.db import Database, DatabaseError, loads, open_database
from storelink.hq.events_walk import EventWalker
from storelink.hq.summary import Summary

log = logging.getLogger(__name__)
SCAN_LIMIT = 50_000  # new events per store and pass (a long backlog is followed over several passes)
STORES_PER_COMMIT = 200  # one commit (one fsync) per this many stores, not one per store


def run_tracker(settings: Any, stop: threading.Event) -> None:
    """The tracker thread of an ingest worker: try for the lock every pass, run while holding it."""
    db: Database | None = None
    holding = False
    tracker: Tracker | None = None
    while not stop.wait(settings.tracker_every):
        try:
            if db is None:
                db = open_database(settings.database, password=settings.database_password,
                                   application=f"storelink-tracker-{settings.worker_id}")
                holding = False
            if not holding:
                holding = db.try_lock("tracker")
                if holding:
                    log.info("worker %s runs the tracker", settings.worker_id)
                    tracker = Tracker(db, gap_grace=settings.gap_grace, grace=settings.price_grace)
            if holding and tracker is not None:
                tracker.run_pass(stop=stop)
        except DatabaseError as err:
            log.error("tracker: %s", err)
            if db is not None:
                db.close()
            db, holding, tracker = None, False, None  # a new connection; the lock may have gone with the old one
    if db is not None:
        db.close()


class Tracker:
    def __init__(self, db: Database, *, gap_grace: float = 60.0, grace: float = 10.0):
        self.db = db
        self.gap_grace = gap_grace
        self.summary = Summary(db)
        self.walker = EventWalker(db, grace=grace)
        self.stop: threading.Event | None = None  # set by the worker's shutdown: a pass ends between chunks

    def run_pass(self, now: float | None = None, stop: threading.Event | None = None) -> None:
        """One pass; a set `stop` ends it between steps (the next pass, here or in another worker, resumes)."""
        now = time.time() if now is None else now
        self.stop = self.walker.stop = stop
        steps: tuple[Callable[[], set[str]], ...] = (
            lambda: self.summary.fold_retained(now), lambda: self.track_seqs(now), lambda: self.settle_gaps(now),
            lambda: self.walker.walk(now))
        dirty: set[str] = set()
        for step in steps:
            if stop is not None and stop.is_set():
                return
            dirty |= step()
        self.summary.evaluate(dirty, now)

    # -- 2. seq tracking ---------------------------------------------------------------------------------------
    def track_seqs(self, now: float) -> set[str]:
        rows = self.db.query("SELECT store_id, checked_seq, (SELECT max(seq) FROM events e "
                             "WHERE e.store_id = s.store_id) FROM stores s")
        todo = [(s, c) for s, c, top in rows if top is not None and (c is None or top > c)]
        for i in range(0, len(todo), STORES_PER_COMMIT):
            if self.stop is not None and self.stop.is_set():
                break
            with self.db.transaction():
                for store, checked in todo[i:i + STORES_PER_COMMIT]:
                    if checked is None:  # tracking starts where head office first heard of the store
                        checked = int(self.db.query("SELECT min(seq) FROM events WHERE store_id = ?",
                                                    (store,))[0][0]) - 1
                        self.db.execute("UPDATE stores SET checked_seq = ?, compliance_seq = ? WHERE store_id = ?",
                                        (checked, checked, store))
                    self._scan(store, int(checked), now)
        return {s for s, _c in todo}

    def _scan(self, store: str, checked: int, now: float) -> None:
        """New events of one store past `checked`: holes become open gaps. Inside track_seqs' transaction."""
        rows = self.db.query(
            "SELECT seq, received_at, CASE WHEN kind = 'outbox.evicted' THEN data END FROM events "
            "WHERE store_id = ? AND seq > ? ORDER BY seq LIMIT ?", (store, checked, SCAN_LIMIT))
        gaps: list[tuple[int, int, float]] = []
        notices: list[Any] = []
        prev = checked
        last_at = 0.0
        for seq, received_at, notice in rows:
            if seq > prev + 1:
                # Seen no earlier than the event after the hole arrived: `now` is the pass's start, and an outbox
                # report that came just before that event (so before head office knew of the gap) must not count
                # as one made after it (settle_gaps asks for that).
                gaps.append((prev + 1, seq - 1, max(now, received_at)))
            prev = max(prev, seq)
            last_at = max(last_at, received_at)
            if notice is not None:
                notices.append(loads(notice))
        for first, last, seen in gaps:
            self.db.execute("INSERT INTO seq_gaps (store_id, first_seq, last_seq, state, detected_at) "
                            "VALUES (?, ?, ?, 'open', ?) ON CONFLICT (store_id, first_seq) DO NOTHING",
                            (store, first, last, seen))
        notified = self._record_evictions(store, notices, now)
        self.db.execute(
            "UPDATE stores SET checked_seq = ?, max_seq = ?, last_event_at = ?, "
            "last_seen = CASE WHEN last_seen IS NULL OR last_seen < ? THEN ? ELSE last_seen END, "
            "notified_evicted = CASE WHEN notified_evicted IS NULL OR notified_evicted < ? THEN ? "
            "ELSE notified_evicted END WHERE store_id = ?",
            (prev, prev, last_at, last_at, last_at, notified, notified, store))
        if gaps:
            log.info("store %s: seq gap(s) %s (checking whether the store evicted them)", store,
                     ", ".join(f"{a}-{b}" for a, b, _seen in gaps))

    def _record_evictions(self, store: str, notices: list[Any], now: float) -> int:
        """Store the evicted seq ranges the store reported; returns the highest evicted_total it reported."""
        top = 0
        for notice in notices:
            try:
                report = EvictionReport.model_validate(notice)
            except ValidationError as err:
                log.warning("store %s: an outbox.evicted report that is not the contract's: %s", store, err)
                continue
            self.db.executemany("INSERT INTO evictions (store_id, first_seq, last_seq, reported_at) "
                                "VALUES (?, ?, ?, ?) ON CONFLICT (store_id, first_seq) DO NOTHING",
                                [(store, a, b, now) for a, b in report.ranges if a <= b])
            top = max(top, report.evicted_total)
        return top

    # -- 3. settling gaps -------------------------------------------------------------------------------------
    def settle_gaps(self, now: float) -> set[str]:
        rows = self.db.query(
            "SELECT g.store_id, g.first_seq, g.last_seq, g.state, g.detected_at, s.outbox_reported_at, "
            "s.evicted_total, s.notified_evicted FROM seq_gaps g JOIN stores s ON s.store_id = g.store_id "
            "WHERE g.state IN ('open', 'missing') ORDER BY g.store_id, g.first_seq")
        dirty: set[str] = set()
        for store, first, last, state, detected, reported_at, evicted_total, notified in rows:
            present = {s for (s,) in self.db.query(
                "SELECT seq FROM events WHERE store_id = ? AND seq BETWEEN ? AND ?", (store, first, last))}
            evicted = self.db.query("SELECT first_seq, last_seq FROM evictions WHERE store_id = ? AND first_seq <= ? "
                                    "AND last_seq >= ?", (store, last, first))
            # A store that reports its evictions has told us all of them once its outbox state (sent after we saw
            # the gap) counts no more than its reports did; one that never reports them gets the grace alone.
            reported = reported_at is None or (reported_at > detected and (evicted_total or 0) <= (notified or 0))
            settled = now - detected >= self.gap_grace and reported
            pieces = _subtract(first, last, present, [(a, b) for a, b in evicted])
            unchanged = pieces == [(first, last, "hole")] and (state == "missing" or not settled)
            if unchanged:
                continue
            dirty.add(store)
            with self.db.transaction():
                self.db.execute("DELETE FROM seq_gaps WHERE store_id = ? AND first_seq = ?", (store, first))
                for a, b, what in pieces:
                    new_state = "evicted" if what == "evicted" else ("missing" if settled or state == "missing"
                                                                     else "open")
                    self.db.execute(
                        "INSERT INTO seq_gaps (store_id, first_seq, last_seq, state, detected_at, resolved_at) "
                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (store_id, first_seq) DO UPDATE SET "
                        "last_seq = excluded.last_seq, state = excluded.state, resolved_at = excluded.resolved_at",
                        (store, a, b, new_state, detected, now if new_state == "evicted" else None))
                self._sync_gap_alerts(store, now)
        return dirty

    def _sync_gap_alerts(self, store: str, now: float) -> None:
        missing = self.db.query("SELECT first_seq, last_seq, detected_at FROM seq_gaps WHERE store_id = ? AND "
                                "state = 'missing'", (store,))
        for first, last, detected in missing:
            n = last - first + 1
            seqs = f"seq {first}" if n == 1 else f"seq {first}-{last}"
            alerts.open_alert(self.db, store, "seq_gap", str(first),
                              f"{n} event{'s' if n > 1 else ''} missing: {seqs} never arrived and the store did "
                              f"not report evicting {'it' if n == 1 else 'them'}",
                              {"first_seq": first, "last_seq": last, "count": n, "detected_at": detected}, now)
        alerts.close_others(self.db, store, "seq_gap", [str(f) for f, _l, _d in missing], now)


def _subtract(first: int, last: int, present: set[int], evicted: list[tuple[int, int]]
              ) -> list[tuple[int, int, str]]:
    """[first, last] without the seqs that arrived, split into runs the store evicted and holes.

    Works on boundaries only, so a gap spanning millions of seqs costs as much as one spanning three."""
    covered = [(max(a, first), min(b, last)) for a, b in evicted if a <= last and b >= first]
    inside = {s for s in present if first <= s <= last}
    points = sorted({first, last + 1} | {p for s in inside for p in (s, s + 1)}
                    | {p for a, b in covered for p in (a, b + 1)})
    out: list[tuple[int, int, str]] = []
    for start, end in itertools.pairwise(points):  # [start, end - 1] is all one kind
        if start in inside:
            continue
        kind = "evicted" if any(a <= start <= b for a, b in covered) else "hole"
        if out and out[-1][2] == kind and out[-1][1] == start - 1:
            out[-1] = (out[-1][0], end - 1, kind)
        else:
            out.append((start, end - 1, kind))
    return out


def gap_summary(db: Database, store: str, limit: int = 50) -> list[dict[str, Any]]:
    rows = db.query("SELECT first_seq, last_seq, state, detected_at, resolved_at FROM seq_gaps WHERE store_id = ? "
                    "ORDER BY first_seq DESC LIMIT ?", (store, limit))
    return [{"first_seq": a, "last_seq": b, "count": b - a + 1, "state": s, "detected_at": d, "resolved_at": r}
            for a, b, s, d, r in rows]

