"""A durable queue of label print jobs in SQLite, per printer, beside the gateway's own database.

States of a job: queued -> sent -> printed, or cancelled (aborted before it was sent). A job is `sent` while
its bytes are on the way to the printer and until a later `~HS` shows the printer healthy with nothing left
to print. On start-up every `sent` job goes back to `queued`: a gateway killed between writing the bytes and
recording the result prints that label again. The choice is at-least-once, on purpose: a duplicate shelf label
costs a few cents of paper, a missing one leaves the old price on the shelf while the till charges the new.

The queue also remembers, per SKU, the last label this printer printed; an abort queues that label again for
every item whose new label may already be on paper.

All methods are blocking; the driver calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from storelink.system.sqlite import Synchronous, open_db, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL,
    sku TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('new', 'restore')),
    payload BLOB NOT NULL,
    previous BLOB,
    previous_version INTEGER,
    state TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'printed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    note TEXT,
    UNIQUE (version, sku, kind)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    items INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS shown (
    sku TEXT PRIMARY KEY,
    version INTEGER,
    payload BLOB NOT NULL
);
"""

KEEP_DONE_S = 30 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class NewLabel:
    sku: str
    payload: bytes
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    id: int
    version: int
    sku: str
    kind: str
    payload: bytes


class LabelQueue:
    def __init__(self, path: Path, synchronous: Synchronous = "FULL"):
        self.path = path
        self._lock = threading.Lock()
        self._db = open_db(path, synchronous=synchronous)
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # recovery -----------------------------------------------------------------------------------------------
    def recover(self) -> int:
        """After a restart: jobs whose fate is unknown are sent again (at-least-once). Returns how many."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                n = db.execute("UPDATE jobs SET state='queued', updated=?, note='re-sent after restart' "
                               "WHERE state='sent'", (now,)).rowcount
                db.execute("DELETE FROM jobs WHERE state IN ('printed', 'cancelled') AND updated < ?",
                           (now - KEEP_DONE_S,))
        return n

    # the price change's phases ---------------------------------------------------------------------------
    def prepare(self, version: int, labels: Iterable[NewLabel]) -> int:
        """Queue `labels` for `version` (idempotent: a repeated prepare adds nothing), all in one transaction,
        taking them one at a time (a generator keeps 100,000 rendered labels out of memory). Returns jobs added.
        Raises ValueError for a version that was already aborted here."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                row = db.execute("SELECT state FROM versions WHERE version=?", (version,)).fetchone()
                if row and row[0] == "aborted":
                    raise ValueError(f"price version {version} was aborted on this printer")
                added = items = 0
                for label in labels:
                    items += 1
                    prev = db.execute("SELECT payload, version FROM shown WHERE sku=?", (label.sku,)).fetchone()
                    added += db.execute(
                        "INSERT OR IGNORE INTO jobs (version, sku, kind, payload, previous, previous_version, "
                        "state, created, updated, note) VALUES (?, ?, 'new', ?, ?, ?, 'queued', ?, ?, ?)",
                        (version, label.sku, label.payload, prev[0] if prev else None, prev[1] if prev else None,
                         now, now, label.note),
                    ).rowcount
                db.execute("INSERT OR IGNORE INTO versions (version, state, items, updated) "
                           "VALUES (?, 'prepared', ?, ?)", (version, items, now))
        return added

    def commit(self, version: int) -> None:
        with self._lock:
            self._db.execute("UPDATE versions SET state='committed', updated=? WHERE version=? AND state='prepared'",
                             (time.time(), version))

    def abort(self, version: int) -> tuple[int, int, list[str]]:
        """Cancel the version's unsent jobs; queue the previous label for every item whose new label was or may
        have been printed. Returns (cancelled, restores queued, SKUs with no earlier label to restore)."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                db.execute("INSERT INTO versions (version, state, items, updated) VALUES (?, 'aborted', 0, ?) "
                           "ON CONFLICT (version) DO UPDATE SET state='aborted', updated=excluded.updated",
                           (version, now))
                cancelled = db.execute("UPDATE jobs SET state='cancelled', updated=? WHERE version=? "
                                       "AND kind='new' AND state='queued'", (now, version)).rowcount
                rows = db.execute("SELECT sku, previous, previous_version FROM jobs WHERE version=? AND kind='new' "
                                  "AND state IN ('sent', 'printed')", (version,)).fetchall()
                restored, unknown = 0, []
                for sku, previous, previous_version in rows:
                    if previous is None:
                        unknown.append(sku)
                        continue
                    restored += db.execute(
                        "INSERT OR IGNORE INTO jobs (version, sku, kind, payload, previous_version, state, created, "
                        "updated, note) VALUES (?, ?, 'restore', ?, ?, 'queued', ?, ?, 'abort: old price again')",
                        (version, sku, previous, previous_version, now, now),
                    ).rowcount
        return cancelled, restored, unknown

    def confirmed(self, version: int) -> bool:
        with self._lock:
            row = self._db.execute("SELECT state FROM versions WHERE version=?", (version,)).fetchone()
            if row is None or row[0] == "aborted":
                return False
            left = self._db.execute("SELECT COUNT(*) FROM jobs WHERE version=? AND kind='new' AND state!='printed'",
                                    (version,)).fetchone()[0]
        return int(left) == 0

    def labels_left(self, version: int) -> tuple[int, int]:
        """(labels of `version` not printed yet, labels of `version` in all)."""
        with self._lock:
            left, total = self._db.execute(
                "SELECT COUNT(*) - COALESCE(SUM(state='printed'), 0), COUNT(*) FROM jobs WHERE version=? "
                "AND kind='new'", (version,)).fetchone()
        return int(left), int(total)

    def latest_confirmed(self) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(v.version) FROM versions v WHERE v.state != 'aborted' AND NOT EXISTS "
                "(SELECT 1 FROM jobs j WHERE j.version=v.version AND j.kind='new' AND j.state!='printed')"
            ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    # the printer loop -------------------------------------------------------------------------------------
    def take(self, limit: int) -> list[Job]:
        """The oldest queued jobs, marked `sent` (durably) before a single byte goes to the printer."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                rows = db.execute("SELECT id, version, sku, kind, payload FROM jobs WHERE state='queued' "
                                  "ORDER BY id LIMIT ?", (limit,)).fetchall()
                db.executemany("UPDATE jobs SET state='sent', attempts=attempts+1, updated=? WHERE id=?",
                               [(now, r[0]) for r in rows])
        return [Job(*r) for r in rows]

    def has_sent(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE state='sent' LIMIT 1").fetchone() is not None

    def requeue_sent(self, reason: str) -> int:
        with self._lock:
            return self._db.execute("UPDATE jobs SET state='queued', updated=?, note=? WHERE state='sent'",
                                    (time.time(), reason[:200])).rowcount

    def mark_sent_printed(self) -> list[Job]:
        """Every `sent` job is on paper: record it, and remember each label as the one the shelf now shows."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                rows = db.execute("SELECT id, version, sku, kind, payload, previous_version FROM jobs "
                                  "WHERE state='sent' ORDER BY id").fetchall()
                for job_id, version, sku, kind, payload, previous_version in rows:
                    db.execute("UPDATE jobs SET state='printed', updated=? WHERE id=?", (now, job_id))
                    shown_version = version if kind == "new" else previous_version
                    db.execute("INSERT INTO shown (sku, version, payload) VALUES (?, ?, ?) ON CONFLICT (sku) "
                               "DO UPDATE SET version=excluded.version, payload=excluded.payload",
                               (sku, shown_version, payload))
        return [Job(*r[:5]) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = {"queued": 0, "sent": 0, "printed": 0, "cancelled": 0}
        out.update({state: int(n) for state, n in rows})
        return out

    def jobs(self, version: int | None = None) -> list[dict[str, object]]:
        """Job records (without the label bytes) for status pages and tests."""
        sql = "SELECT id, version, sku, kind, state, attempts, note FROM jobs"
        args: tuple[int, ...] = ()
        if version is not None:
            sql, args = sql + " WHERE version=?", (version,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        keys = ("id", "version", "sku", "kind", "state", "attempts", "note")
        return [dict(zip(keys, r, strict=True)) for r in rows]
