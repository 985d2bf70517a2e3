"""A durable queue of label print jobs in SQLite, per printer, beside the gateway's own database.

States of a job: queued -> sent -> printed, or cancelled (aborted before it was sent). A job is `sent` while
its bytes are on the way to the printer and until a later `~HS` shows the printer healthy with nothing left
to print. On start-up every `sent` job goes back to `queued`: a gateway killed between writing the bytes and
recording the result prints that label again. The choice is at-least-once, on purpose: a duplicate shelf label
costs a few cents of paper, a missing one leaves the old price on the shelf while the till charges the new.
A job that was ever handed to the printer (`attempts` > 0) may be on paper, whatever its state says now.

Kinds: `new` (a version's label), `restore` (the label from before an aborted version), `reprint` (the label in
force printed again on request: one job per request and label).

The queue also remembers, per SKU, the last label this printer printed; an abort queues that label again for
every item whose new label may already be on paper. A version printed ahead of its effective time (`valid_from`)
and aborted before it is void instead: those labels were never on the shelf.

All methods are blocking; the driver calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from storelink.drivers.base import LabelShows
from storelink.system.sqlite import Synchronous, open_db, transaction

JOBS_DDL = (
    """CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL,
    sku TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('new', 'restore', 'reprint')),
    payload BLOB NOT NULL,
    previous BLOB,
    previous_version INTEGER,
    state TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'printed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    note TEXT,
    request TEXT NOT NULL DEFAULT '',
    UNIQUE (version, sku, kind, request)
)""",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id)",
)
SCHEMA = ";\n".join(JOBS_DDL) + """;
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    items INTEGER NOT NULL,
    updated REAL NOT NULL,
    valid_from REAL,
    aborted_at REAL
);
CREATE TABLE IF NOT EXISTS shown (
    sku TEXT PRIMARY KEY,
    version INTEGER,
    payload BLOB NOT NULL
);
"""

KEEP_DONE_S = 30 * 24 * 3600
SCHEMA_VERSION = 2  # 2: reprint jobs (one per request); versions.valid_from and aborted_at
_V1_COLUMNS = ("id, version, sku, kind, payload, previous, previous_version, state, attempts, created, updated, "
               "note")


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a queue file of an earlier release up to SCHEMA_VERSION. SQLite cannot alter a CHECK constraint, so
    an old jobs table is copied into the new shape once, in one transaction."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        jobs = db.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='jobs'").fetchone()
        if "'reprint'" not in jobs[0]:
            db.execute("DROP INDEX IF EXISTS jobs_state")
            db.execute("ALTER TABLE jobs RENAME TO jobs_v1")
            for ddl in JOBS_DDL:
                db.execute(ddl)
            db.execute(f"INSERT INTO jobs ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM jobs_v1")
            db.execute("DROP TABLE jobs_v1")
        have = {r[1] for r in db.execute("PRAGMA table_info(versions)")}
        for column in ("valid_from REAL", "aborted_at REAL"):
            if column.split()[0] not in have:
                db.execute(f"ALTER TABLE versions ADD COLUMN {column}")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


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
        _migrate(self._db)

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
    def prepare(self, version: int, labels: Iterable[NewLabel], valid_from: float | None = None) -> int:
        """Queue `labels` for `version` (idempotent: a repeated prepare adds nothing), all in one transaction,
        taking them one at a time (a generator keeps 100,000 rendered labels out of memory). Returns jobs added.
        `valid_from`: the labels are printed ahead of that time (marked with it). Raises ValueError for a version
        that was already aborted here."""
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
                db.execute("INSERT OR IGNORE INTO versions (version, state, items, updated, valid_from) "
                           "VALUES (?, 'prepared', ?, ?, ?)", (version, items, now, valid_from))
        return added

    def commit(self, version: int) -> None:
        with self._lock:
            self._db.execute("UPDATE versions SET state='committed', updated=? WHERE version=? AND state='prepared'",
                             (time.time(), version))

    def abort(self, version: int) -> tuple[int, int, list[str], bool]:
        """Cancel the version's unsent jobs; queue the previous label for every item whose new label was or may
        have been printed (ever handed to the printer: also a job re-queued after a restart). A version printed
        ahead of its valid_from and aborted before it is void: nothing to restore. Returns (cancelled, restores
        queued, SKUs with no earlier label to restore, void). Idempotent."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                db.execute("INSERT INTO versions (version, state, items, updated, aborted_at) "
                           "VALUES (?, 'aborted', 0, ?, ?) ON CONFLICT (version) DO UPDATE SET state='aborted', "
                           "updated=excluded.updated, aborted_at=COALESCE(versions.aborted_at, excluded.aborted_at)",
                           (version, now, now))
                void = self._void(db, version)
                cancelled = db.execute("UPDATE jobs SET state='cancelled', updated=? WHERE version=? "
                                       "AND kind='new' AND state='queued'", (now, version)).rowcount
                # not where a later label was printed since (it is what the shelf shows: nothing to put back)
                rows = [] if void else db.execute(
                    "SELECT j.sku, j.previous, j.previous_version FROM jobs j WHERE j.version=? AND j.kind='new' "
                    "AND (j.attempts > 0 OR j.state='printed') AND NOT EXISTS (SELECT 1 FROM shown s "
                    "WHERE s.sku=j.sku AND s.version > j.version)", (version,)).fetchall()
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
        return cancelled, restored, unknown, void

    @staticmethod
    def _void(db: sqlite3.Connection, version: int) -> bool:
        row = db.execute("SELECT valid_from, aborted_at FROM versions WHERE version=?", (version,)).fetchone()
        return row is not None and row[0] is not None and row[1] is not None and row[1] < row[0]

    def label_states(self, version: int, swap_seconds: float = 0.0) -> dict[str, LabelShows]:
        """SKU -> what the shelf label of each item of `version` is known to show: "new" (this version's label,
        or a later one), "old" (the label from before it: never printed, cancelled, restored, or void) or
        "unknown" (handed to the printer, not confirmed). After an abort a label that may have reached the
        printer counts as printed ("new") until its restore label is printed. A label printed ahead of its
        valid-from time counts as on the shelf `swap_seconds` after that time (someone has to put it up)."""
        with self._lock:
            state = self._db.execute("SELECT state, valid_from FROM versions WHERE version=?", (version,)).fetchone()
            if state is None:
                return {}
            aborted, void = state[0] == "aborted", self._void(self._db, version)
            not_up_yet = state[1] is not None and time.time() < state[1] + swap_seconds
            rows = self._db.execute(
                "SELECT j.sku, j.state, j.attempts, s.version, (SELECT r.state FROM jobs r WHERE r.version=j.version "
                "AND r.sku=j.sku AND r.kind='restore') FROM jobs j LEFT JOIN shown s ON s.sku=j.sku "
                "WHERE j.version=? AND j.kind='new'", (version,)).fetchall()
        out: dict[str, LabelShows] = {}
        for sku, job, attempts, shown_version, restore in rows:
            if aborted:  # a label that may have reached the printer counts as printed until its restore is
                later = shown_version is not None and shown_version > version  # a later label replaced it
                out[sku] = "old" if void or later or restore == "printed" or (job != "printed" and attempts == 0) \
                    else "new"
            elif not_up_yet:
                out[sku] = "old"
            elif shown_version is not None and shown_version >= version:
                out[sku] = "new"
            else:
                out[sku] = "new" if job == "printed" else "unknown" if attempts > 0 else "old"
        return out

    def reprint(self, version: int, labels: list[NewLabel], request: str) -> int:
        """Queue `labels` (the labels in force, of `version`) to print again, one job each for this request, also
        where that label was printed before (idempotent per request). Returns how many were queued."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                n = 0
                for label in labels:
                    n += db.execute(
                        "INSERT OR IGNORE INTO jobs (version, sku, kind, payload, state, created, updated, note, "
                        "request) VALUES (?, ?, 'reprint', ?, 'queued', ?, ?, 'reprint', ?)",
                        (version, label.sku, label.payload, now, now, request)).rowcount
        return n

    def confirmed(self, version: int, swap_seconds: float = 0.0) -> bool:
        """Every label of `version` printed (and, printed ahead, `swap_seconds` past its valid-from time)."""
        with self._lock:
            row = self._db.execute("SELECT state, valid_from FROM versions WHERE version=?", (version,)).fetchone()
            if row is None or row[0] == "aborted" or (row[1] is not None and time.time() < row[1] + swap_seconds):
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

    def requeue_sent(self, reason: str, written: bool = True) -> int:
        """Sent jobs go back to the queue. `written` False: the connection failed before a byte went out, so the
        attempt does not count (the label cannot be on paper)."""
        with self._lock:
            return self._db.execute("UPDATE jobs SET state='queued', updated=?, note=?, attempts=attempts-? "
                                    "WHERE state='sent'", (time.time(), reason[:200], 0 if written else 1)).rowcount

    def mark_sent_printed(self) -> list[Job]:
        """Every `sent` job is on paper: record it, and remember each label as the one the shelf now shows."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                rows = db.execute("SELECT id, version, sku, kind, payload, previous_version FROM jobs "
                                  "WHERE state='sent' ORDER BY id").fetchall()
                for job_id, version, sku, kind, payload, previous_version in rows:
                    db.execute("UPDATE jobs SET state='printed', updated=? WHERE id=?", (now, job_id))
                    shown_version = previous_version if kind == "restore" else version
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
