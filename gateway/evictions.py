"""Which seqs the outbox evicted under its cap, kept durably, and the reports of them (`outbox.evicted` events).

Each evicted seq is recorded, as runs of consecutive seqs in the ``evicted`` table, in the same transaction that
deletes it from the outbox. A report takes the runs not yet reported and forgets them, in the transaction that
inserts the report event, so every eviction is reported exactly once, across crashes. Reports are spaced by
``NOTICE_EVERY`` (the first at once): a store at its cap for days must not fill its outbox with reports, which are
never evicted themselves. ``total`` counts every eviction since the outbox was created, ``notified`` those reported.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

NOTICE_EVERY = 10.0  # seconds between two reports while telemetry is being evicted
NOTICE_RANGES = 1000  # seq runs per report (the rest goes in the next one at once)
EVICTION_KIND = "outbox.evicted"


def create_evicted_table(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS evicted (first INTEGER PRIMARY KEY, last INTEGER NOT NULL)")


@dataclass(frozen=True, slots=True)
class EvictState:
    """Immutable, so the outbox restores it after a rolled-back transaction by keeping the old object."""

    run: tuple[int, int] | None = None  # the last evicted run (first, last) still in the evicted table
    total: int = 0  # evicted since the outbox was created
    notified: int = 0  # of those, reported
    unreported: bool = False


class EvictionLog:
    """The outbox writer thread's record of evictions (only that thread touches it)."""

    def __init__(self) -> None:
        self.state = EvictState()
        self._last_report = 0.0

    def open(self, conn: sqlite3.Connection) -> None:
        """After the outbox's schema is in place (create_evicted_table is part of it)."""
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('evicted_total', 'evicted_notified')"))
        left = conn.execute("SELECT count(*) FROM evicted").fetchone()[0]  # evicted before a crash, not reported
        self.state = EvictState(None, meta.get("evicted_total", 0), meta.get("evicted_notified", 0), left > 0)

    def note(self, conn: sqlite3.Connection, seq: int) -> None:
        """seq was just evicted (inside the evicting transaction): extend the last run when it follows it."""
        run = self.state.run
        if run is not None and run[1] == seq - 1:
            conn.execute("UPDATE evicted SET last=? WHERE first=?", (seq, run[0]))
            run = (run[0], seq)
        else:
            conn.execute("INSERT INTO evicted(first, last) VALUES (?, ?)", (seq, seq))
            run = (seq, seq)
        s = self.state
        self.state = EvictState(run, s.total + 1, s.notified, True)

    def wait(self) -> float | None:
        """How long the writer may sleep before a report is due (None: none is)."""
        if not self.state.unreported:
            return None
        return max(0.01, NOTICE_EVERY - (time.monotonic() - self._last_report))

    def due(self) -> bool:
        return self.state.unreported and time.monotonic() - self._last_report >= NOTICE_EVERY

    def take_report(self, conn: sqlite3.Connection) -> dict[str, Any] | None:
        """The data of the next report (contract.EvictionReport), its runs forgotten; None when nothing is left."""
        runs = conn.execute("SELECT first, last FROM evicted ORDER BY first LIMIT ?", (NOTICE_RANGES,)).fetchall()
        s = self.state
        if not runs:
            self.state = EvictState(s.run, s.total, s.notified, False)
            return None
        count = sum(last - first + 1 for first, last in runs)
        conn.execute("DELETE FROM evicted WHERE first <= ?", (runs[-1][0],))
        run = None if s.run is not None and s.run[0] <= runs[-1][0] else s.run
        self.state = EvictState(run, s.total, s.notified + count, len(runs) == NOTICE_RANGES)
        self._last_report = time.monotonic()
        return {"ranges": [[first, last] for first, last in runs], "count": count,
                "evicted_total": self.state.notified}

    def save(self, conn: sqlite3.Connection, before: EvictState) -> None:
        """Write the counts into meta when this transaction changed them."""
        if self.state != before:
            conn.executemany("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                             "value=excluded.value", [("evicted_total", self.state.total),
                                                      ("evicted_notified", self.state.notified)])
