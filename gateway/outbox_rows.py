"""The outbox's rows as its writer thread changes them: seq numbering, inserts under the cap, eviction of the
oldest telemetry, deletes of delivered rows; and the records the outbox hands out.

:class:`OutboxRows` works inside a transaction its caller (storelink.outbox's writer) opened and commits, on the
writer thread only. It keeps the counters (:class:`OutboxStats`) in step with the table; a caller whose
transaction rolled back puts them back with :meth:`OutboxRows.restore`.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storelink import safe_json
from storelink.config import StorageConfig
from storelink.contract import EventPayload
from storelink.evictions import EVICTION_KIND, EvictionLog, EvictState

Snapshot = tuple[int, int, int, int, int, EvictState]  # next_seq, depth, bytes, critical, evict_from, evictions
log = logging.getLogger("storelink.outbox")


class OutboxError(Exception):
    """An event could not be accepted; nothing was written for it."""


class OutboxFull(OutboxError):
    """The cap is reached and there is no telemetry left to evict (or the disk is full)."""


class EventRejected(OutboxError):
    """The event itself can never be stored (not JSON-safe, too deep, too large): the caller's input is wrong,
    retrying it unchanged cannot help. Raised before anything is queued to the writer."""


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    seq: int


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    id: str
    kind: str
    ts: float
    payload: bytes


@dataclass(slots=True)
class PendingEvent:
    id: str
    ts: float
    kind: str
    device: str
    data_json: str  # validated: encodes as UTF-8 (safe_json.dumps_text)
    critical: bool


@dataclass
class OutboxStats:
    depth: int = 0
    bytes: int = 0
    critical: int = 0
    accepted_total: int = 0
    delivered_total: int = 0
    evicted_total: int = 0
    refused_total: int = 0
    commits_total: int = 0
    alarms: dict[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def iso_ts(ts: float) -> str:
    """ISO 8601 UTC with milliseconds; the seconds part is cached because events come in bursts."""
    ms = int(ts * 1000)
    return f"{_iso_second(ms // 1000)}{ms % 1000:03d}Z"


class OutboxRows:
    def __init__(self, config: StorageConfig, stats: OutboxStats, alarm: Callable[[str, str | None], None],
                 evictions: EvictionLog):
        self.config, self.stats, self._alarm, self.evictions = config, stats, alarm, evictions
        self.next_seq = 1
        self.meta_seq = 0  # next_seq as the meta row has it on disk
        self.evict_from = 0  # no telemetry row has a lower seq (eviction's place in the rowid order)

    def snapshot(self) -> Snapshot:
        s = self.stats
        return (self.next_seq, s.depth, s.bytes, s.critical, self.evict_from, self.evictions.state)

    def restore(self, saved: Snapshot) -> None:
        """After a rollback: the numbers and counters as they were before the transaction."""
        s = self.stats
        self.next_seq, s.depth, s.bytes, s.critical, self.evict_from, self.evictions.state = saved

    def keep_seq_mark(self, conn: sqlite3.Connection) -> int:
        """After deletes: when the newest row went, the meta row keeps next_seq (same transaction)."""
        top = conn.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
        if top + 1 < self.next_seq and self.meta_seq != self.next_seq:
            conn.execute("INSERT INTO meta(key, value) VALUES('next_seq', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (self.next_seq,))
            return self.next_seq
        return self.meta_seq

    def row(self, p: PendingEvent) -> tuple[int, str, str, int, float, bytes]:
        """The row for p under the next seq (taken here; callers that do not keep the row restore it)."""
        seq = self.next_seq
        payload = EventPayload.encode(p.id, seq, iso_ts(p.ts), p.kind, p.device, p.data_json)
        self.next_seq += 1
        return (seq, p.id, p.kind, int(p.critical), p.ts, payload)

    def count(self, events: int, size: int, critical: int) -> None:
        self.stats.depth += events
        self.stats.bytes += size
        self.stats.critical += critical

    def insert_under_cap(self, conn: sqlite3.Connection, puts: list[Any]) -> list[Any] | None:
        """The common case: the whole batch fits under the cap, so no call can fail on its own and one INSERT
        takes every call's rows (a savepoint per call costs a third of the commit). None when it does not fit."""
        first_seq = self.next_seq
        rows: list[tuple[int, str, str, int, float, bytes]] = []
        results: list[Any] = []
        for pending, fut, loop in puts:
            first = len(rows)
            rows.extend(self.row(p) for p in pending)
            results.append(((fut, loop), [Accepted(id=r[1], seq=r[0]) for r in rows[first:]]))
        size = sum(len(r[5]) for r in rows)
        if self.stats.depth + len(rows) > self.config.max_events or self.stats.bytes + size > self.config.max_bytes:
            self.next_seq = first_seq
            return None
        self.count(len(rows), size, sum(r[3] for r in rows))
        if "capacity" in self.stats.alarms and self.stats.bytes < 0.9 * self.config.max_bytes:
            self._alarm("capacity", None)
        conn.executemany("INSERT INTO outbox(seq, id, kind, critical, ts, payload) VALUES (?,?,?,?,?,?)", rows)
        return results

    def insert_call(self, conn: sqlite3.Connection, pending: list[PendingEvent]) -> list[Accepted]:
        """Insert one caller's events, all or none (a savepoint), evicting telemetry if the cap needs it."""
        conn.execute("SAVEPOINT call")
        saved = self.snapshot()
        try:
            rows = []
            for p in pending:
                row = self.row(p)
                self.make_room(conn, len(row[5]), p.critical, p.kind)
                self.count(1, len(row[5]), row[3])
                rows.append(row)
            conn.executemany("INSERT INTO outbox(seq, id, kind, critical, ts, payload) VALUES (?,?,?,?,?,?)", rows)
        except OutboxFull:
            conn.execute("ROLLBACK TO call")
            conn.execute("RELEASE call")
            self.restore(saved)
            self.stats.refused_total += len(pending)
            raise
        conn.execute("RELEASE call")
        return [Accepted(id=r[1], seq=r[0]) for r in rows]

    def over_cap(self, extra_bytes: int) -> bool:
        c = self.config
        return self.stats.depth + 1 > c.max_events or self.stats.bytes + extra_bytes > c.max_bytes

    def make_room(self, conn: sqlite3.Connection, size: int, critical: bool, kind: str) -> None:
        if not self.over_cap(size):
            if "capacity" in self.stats.alarms and self.stats.bytes < 0.9 * self.config.max_bytes:
                self._alarm("capacity", None)
            return
        evicted = 0
        while self.over_cap(size):
            # Oldest telemetry first, from where the last search stopped (no index: a rowid range scan).
            victims = conn.execute(
                "SELECT seq, length(payload) FROM outbox WHERE seq >= ? AND critical=0 ORDER BY seq LIMIT 256",
                (self.evict_from,),
            ).fetchall()
            if not victims:
                # Rows not inserted yet (later in this call) all have higher seqs than any row in the table.
                self.evict_from = (conn.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0) + 1
                break
            for seq, length in victims:
                if not self.over_cap(size):
                    break
                conn.execute("DELETE FROM outbox WHERE seq=?", (seq,))
                self.evictions.note(conn, seq)
                self.evict_from = seq + 1
                self.stats.depth -= 1
                self.stats.bytes -= length
                evicted += 1
        if self.over_cap(size):
            if not critical:
                self._alarm("capacity", "outbox full of undelivered sales/price events; telemetry refused")
                raise OutboxFull(f"outbox full: {kind!r} refused (only critical events are accepted now)")
            # Critical events are never refused for the cap, only by a full disk.
            self._alarm("capacity", "outbox over its cap with critical events; telemetry refused")
        elif evicted:
            self._alarm("capacity", "outbox at its cap: oldest telemetry is being evicted")

    def report_evictions(self, conn: sqlite3.Connection, event_id: str) -> None:
        """One outbox.evicted event with the runs not yet reported. Critical, so never evicted itself; it may put the
        outbox a little over its cap, which the next put evicts back."""
        data = self.evictions.take_report(conn)
        if data is None:
            return
        row = self.row(PendingEvent(event_id, time.time(), EVICTION_KIND, "gateway", safe_json.dumps_text(data), True))
        conn.execute("INSERT INTO outbox(seq, id, kind, critical, ts, payload) VALUES (?,?,?,?,?,?)", row)
        self.count(1, len(row[5]), 1)
        log.info("outbox at its cap: %d telemetry event(s) evicted since the last report (seq %d-%d); reported",
                 data["count"], data["ranges"][0][0], data["ranges"][-1][1])

    def delete(self, conn: sqlite3.Connection, seqs: list[int]) -> int:
        deleted = 0
        for i in range(0, len(seqs), 500):
            chunk = seqs[i : i + 500]
            marks = ",".join("?" * len(chunk))
            row = conn.execute(
                f"SELECT count(*), coalesce(sum(length(payload)),0), coalesce(sum(critical),0) "
                f"FROM outbox WHERE seq IN ({marks})",
                chunk,
            ).fetchone()
            conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)
            self.stats.depth -= row[0]
            self.stats.bytes -= row[1]
            self.stats.critical -= row[2]
            deleted += row[0]
        return deleted
