"""What the gateway pushed to each electronic shelf label, in SQLite beside the gateway's database.

A push is (version, tag): the content sent, the tag's content hash before the push, and whether the tag has
confirmed it (the access point reports `pending` back to 0 and a different `hash`). The store survives restarts
so the price coordinator can ask `confirmed(v)` again after a crash, and an abort can put the previous content
back: every tag remembers the last content it confirmed. A restore counts once the tag shows the previous
content again (`pending` 0 and the hash from before the push), not when the access point took it. A push of a
scheduled change is `planned` with its content until the change takes effect. A reprint (the content in force,
pushed again on request) is a row of `reprints` until the tag has fetched it.

All methods are blocking; the driver calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

from storelink.drivers.base import LabelShows
from storelink.system.sqlite import Synchronous, open_db, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pushes (
    version INTEGER NOT NULL,
    mac TEXT NOT NULL,
    sku TEXT NOT NULL,
    content TEXT NOT NULL,
    hash_before TEXT NOT NULL,
    hash_after TEXT,
    previous_content TEXT,
    previous_version INTEGER,
    state TEXT NOT NULL CHECK (state IN ('planned', 'pushed', 'confirmed', 'restore_pending', 'restored',
                                         'no_restore', 'cancelled')),
    pushed_at REAL NOT NULL,
    uploaded_at REAL,
    confirmed_at REAL,
    PRIMARY KEY (version, mac)
);
CREATE INDEX IF NOT EXISTS pushes_state ON pushes (state);
CREATE TABLE IF NOT EXISTS shown (
    mac TEXT PRIMARY KEY,
    sku TEXT NOT NULL,
    version INTEGER,
    content TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reprints (
    mac TEXT PRIMARY KEY,
    sku TEXT NOT NULL,
    version INTEGER NOT NULL,
    content TEXT NOT NULL,
    request TEXT NOT NULL,
    requested_at REAL NOT NULL,
    uploaded_at REAL,
    confirmed_at REAL
);
"""
ADDED_COLUMNS = ("restore_uploaded_at REAL",)  # pushes: when the previous content went back to the AP


@dataclasses.dataclass(frozen=True)
class Push:
    version: int
    mac: str
    sku: str
    content: str
    hash_before: str
    previous_content: str | None
    state: str
    pushed_at: float


class EslState:
    def __init__(self, path: Path, synchronous: Synchronous = "FULL"):
        self._lock = threading.Lock()
        self._db = open_db(path, synchronous=synchronous)
        self._db.executescript(SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(pushes)")}
        for column in ADDED_COLUMNS:
            if column.split()[0] not in have:
                self._db.execute(f"ALTER TABLE pushes ADD COLUMN {column}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def version_state(self, version: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM versions WHERE version=?", (version,)).fetchone()
        return str(row[0]) if row else None

    def set_version(self, version: int, state: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO versions (version, state, updated) VALUES (?, ?, ?) ON CONFLICT (version) DO UPDATE "
                "SET state=excluded.state, updated=excluded.updated WHERE versions.state != 'aborted'",
                (version, state, time.time()))

    def plan(self, version: int, tags: list[tuple[str, str, str]]) -> set[str]:
        """Record which (mac, sku, content) the version must reach before anything is sent, so a tag whose upload
        failed still counts as unconfirmed. Returns the MACs the AP already took (a repeated prepare skips them)."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                db.executemany(
                    "INSERT OR IGNORE INTO pushes (version, mac, sku, content, hash_before, state, pushed_at) "
                    "VALUES (?, ?, ?, ?, '', 'planned', ?)", [(version, mac, sku, c, now) for mac, sku, c in tags])
                rows = db.execute("SELECT mac FROM pushes WHERE version=? AND uploaded_at IS NOT NULL",
                                        (version,)).fetchall()
        return {r[0] for r in rows}

    def record_pushes(self, version: int, pushes: list[tuple[str, str, str, str, str | None]]) -> None:
        """(mac, sku, content, hash_before, found_on_ap) for each tag about to get `content`, in one transaction
        and before the uploads: a crash mid-upload leaves these tags `pushed`, so an abort still restores them.
        The content each tag confirmed last (or, for a tag this gateway never wrote, what the access point held
        for it: found_on_ap) is kept for that abort. A tag already pushed keeps its first hash_before."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                db.executemany(
                    "INSERT INTO pushes (version, mac, sku, content, hash_before, previous_content, "
                    "previous_version, state, pushed_at) SELECT ?, ?, ?, ?, ?, COALESCE(s.content, ?), s.version, "
                    "'pushed', ? FROM (SELECT 1) LEFT JOIN shown s ON s.mac=? WHERE true "
                    "ON CONFLICT (version, mac) DO UPDATE SET content=excluded.content, "
                    "hash_before=excluded.hash_before, previous_content=excluded.previous_content, "
                    "previous_version=excluded.previous_version, state='pushed', pushed_at=excluded.pushed_at "
                    "WHERE pushes.state='planned'",
                    [(version, mac, sku, content, before, found, now, mac)
                     for mac, sku, content, before, found in pushes])

    def mark_uploaded(self, version: int, macs: list[str]) -> None:
        with self._lock:
            self._db.executemany("UPDATE pushes SET uploaded_at=? WHERE version=? AND mac=?",
                                 [(time.time(), version, m) for m in macs])

    def unconfirmed(self, version: int | None = None) -> list[Push]:
        sql = ("SELECT version, mac, sku, content, hash_before, previous_content, state, pushed_at FROM pushes p "
               "WHERE state='pushed' AND NOT EXISTS (SELECT 1 FROM versions v WHERE v.version=p.version "
               "AND v.state='aborted')")
        args: tuple[int, ...] = ()
        if version is not None:
            sql, args = sql + " AND version=?", (version,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY pushed_at", args).fetchall()
        return [Push(*r) for r in rows]

    def confirm(self, version: int, mac: str, new_hash: str) -> None:
        """The tag shows this push: remember it as the content to restore if a later version is aborted."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                row = db.execute("SELECT sku, content FROM pushes WHERE version=? AND mac=? AND state='pushed'",
                                       (version, mac)).fetchone()
                if row:
                    db.execute("UPDATE pushes SET state='confirmed', hash_after=?, confirmed_at=? "
                                     "WHERE version=? AND mac=?", (new_hash, now, version, mac))
                    db.execute(
                        "INSERT INTO shown (mac, sku, version, content, hash) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (mac) DO UPDATE SET sku=excluded.sku, version=excluded.version, "
                        "content=excluded.content, hash=excluded.hash WHERE shown.version IS NULL "
                        "OR shown.version <= excluded.version",
                        (mac, row[0], version, row[1], new_hash))

    def all_confirmed(self, version: int) -> bool:
        with self._lock:
            state = self._db.execute("SELECT state FROM versions WHERE version=?", (version,)).fetchone()
            if state is None or state[0] == "aborted":
                return False
            left = self._db.execute("SELECT COUNT(*) FROM pushes WHERE version=? AND state!='confirmed'",
                                    (version,)).fetchone()[0]
        return int(left) == 0

    def labels_left(self, version: int) -> tuple[int, int]:
        """(tags that do not show `version` yet, tags `version` changes)."""
        with self._lock:
            left, total = self._db.execute(
                "SELECT COUNT(*) - COALESCE(SUM(state='confirmed'), 0), COUNT(*) FROM pushes WHERE version=?",
                (version,)).fetchone()
        return int(left), int(total)

    def latest_confirmed(self) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(v.version) FROM versions v WHERE v.state != 'aborted' AND NOT EXISTS "
                "(SELECT 1 FROM pushes p WHERE p.version=v.version AND p.state!='confirmed')").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def abort(self, version: int) -> None:
        """Mark the version aborted and every tag it touched as needing its previous content back."""
        now = time.time()
        with self._lock:
            with transaction(self._db) as db:
                db.execute("INSERT INTO versions (version, state, updated) VALUES (?, 'aborted', ?) "
                                 "ON CONFLICT (version) DO UPDATE SET state='aborted', updated=excluded.updated",
                                 (version, now))
                db.execute("UPDATE pushes SET state='cancelled' WHERE version=? AND state='planned'",
                                 (version,))
                # a tag that confirmed a later version since shows that: nothing of this one to put back
                db.execute("UPDATE pushes SET state='restored' WHERE version=? AND state IN ('pushed', "
                                 "'confirmed') AND EXISTS (SELECT 1 FROM shown s WHERE s.mac=pushes.mac "
                                 "AND s.version > pushes.version)", (version,))
                db.execute("UPDATE pushes SET state='restore_pending' WHERE version=? "
                                 "AND state IN ('pushed', 'confirmed') AND previous_content IS NOT NULL", (version,))
                db.execute("UPDATE pushes SET state='no_restore' WHERE version=? "
                                 "AND state IN ('pushed', 'confirmed') AND previous_content IS NULL", (version,))

    def planned(self, version: int) -> list[tuple[str, str, str]]:
        """(mac, sku, content) of a scheduled version's tags not yet pushed."""
        with self._lock:
            rows = self._db.execute("SELECT mac, sku, content FROM pushes WHERE version=? AND state='planned' "
                                    "ORDER BY mac", (version,)).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def restores_pending(self, uploaded: bool = False) -> list[Push]:
        """Restores still to upload (uploaded=False), or uploaded and waiting for the tag (uploaded=True)."""
        with self._lock:
            rows = self._db.execute("SELECT version, mac, sku, content, hash_before, previous_content, state, "
                                    "pushed_at FROM pushes WHERE state='restore_pending' AND restore_uploaded_at IS "
                                    + ("NOT NULL" if uploaded else "NULL")).fetchall()
        return [Push(*r) for r in rows]

    def restore_uploaded(self, version: int, mac: str) -> None:
        with self._lock:
            self._db.execute("UPDATE pushes SET restore_uploaded_at=? WHERE version=? AND mac=?",
                             (time.time(), version, mac))

    def no_restore(self, version: int) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT sku FROM pushes WHERE version=? AND state='no_restore'",
                                    (version,)).fetchall()
        return [r[0] for r in rows]

    def restored(self, version: int, mac: str) -> None:
        """The tag shows the previous content again: it is again what the tag should show (its hash is the one
        the tag had before the aborted push)."""
        with self._lock:
            with transaction(self._db) as db:
                row = db.execute(
                    "SELECT previous_content, hash_before, previous_version FROM pushes "
                    "WHERE version=? AND mac=? AND state='restore_pending'", (version, mac)).fetchone()
                if row:
                    db.execute("UPDATE pushes SET state='restored' WHERE version=? AND mac=?", (version, mac))
                    db.execute("UPDATE shown SET content=?, hash=?, version=? WHERE mac=?",
                                     (row[0], row[1], row[2], mac))

    def label_states(self, version: int) -> dict[str, LabelShows]:
        """SKU -> what the tag of each item of `version` is known to show: "new" (this version or a later one
        confirmed), "old" (content from before it: never uploaded, not fetched yet, or restored) or "unknown"
        (uploaded, and the abort's restore not confirmed yet)."""
        with self._lock:
            vstate = self._db.execute("SELECT state FROM versions WHERE version=?", (version,)).fetchone()
            rows = self._db.execute(
                "SELECT p.sku, p.state, p.uploaded_at, p.hash_after, s.version FROM pushes p "
                "LEFT JOIN shown s ON s.mac=p.mac WHERE p.version=?", (version,)).fetchall()
        aborted = vstate is not None and vstate[0] == "aborted"
        out: dict[str, LabelShows] = {}
        for sku, state, uploaded_at, hash_after, shown_version in rows:
            if not aborted:
                confirmed = state == "confirmed" or (shown_version is not None and shown_version >= version)
                out[sku] = "new" if confirmed else "old"  # not confirmed: the tag had not fetched it when last seen
            elif state in ("restored", "cancelled", "planned") or uploaded_at is None:
                out[sku] = "old"
            else:  # restore_pending / no_restore of a push the AP took
                out[sku] = "new" if hash_after is not None else "unknown"
        return out

    # reprints ------------------------------------------------------------------------------------------------
    def request_reprints(self, request: str, version: int, tags: list[tuple[str, str, str]]) -> None:
        """(mac, sku, content) to push again; recorded before the uploads (at-least-once)."""
        now = time.time()
        with self._lock:
            self._db.executemany(
                "INSERT INTO reprints (mac, sku, version, content, request, requested_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (mac) DO UPDATE SET sku=excluded.sku, version=excluded.version, content=excluded.content, "
                "request=excluded.request, requested_at=excluded.requested_at, uploaded_at=NULL, confirmed_at=NULL",
                [(mac, sku, version, content, request, now) for mac, sku, content in tags])

    def reprints(self, uploaded: bool) -> list[tuple[str, str]]:
        """(mac, content) of reprints not confirmed: still to upload, or uploaded and waiting for the tag."""
        with self._lock:
            rows = self._db.execute("SELECT mac, content FROM reprints WHERE confirmed_at IS NULL AND uploaded_at IS "
                                    + ("NOT NULL" if uploaded else "NULL")).fetchall()
        return [(r[0], r[1]) for r in rows]

    def reprint_done(self, mac: str, uploaded: bool) -> None:
        col = "confirmed_at" if uploaded else "uploaded_at"
        with self._lock:
            self._db.execute(f"UPDATE reprints SET {col}=? WHERE mac=?", (time.time(), mac))

    def shown(self) -> dict[str, tuple[str, int | None, str]]:
        """mac -> (sku, version, hash) of the content each tag last confirmed."""
        with self._lock:
            rows = self._db.execute("SELECT mac, sku, version, hash FROM shown").fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}
