"""The price database: schema, one writer thread, and per-thread readers.

It is a separate SQLite file from the outbox (``prices.db`` beside it by default) so that a 100k-row batch never
holds the outbox's writer. All writes run on one dedicated thread (``write``), each as one transaction; reads run
on per-thread connections, which in WAL mode never wait for the writer, so a till's LOOKUP is a single indexed
read (tens of microseconds) even while a batch is being staged.

Tables (the journal is ``batches.phase`` + ``targets``):
- ``book``: the prices in force, one row per SKU; ``meta.active_version`` is its version.
- ``batches``: every batch seen, its manifest and phase; ``staged``: a batch's items once verified;
  ``raw_chunks``: chunks that arrived before their manifest (unverified, bounded, dropped after a TTL).
- ``changes``: a batch's diff against the book (old and new price per SKU); while the batch id is in
  ``transitions`` every lookup of those SKUs answers min(old, new).
- ``targets``: each device's progress through a batch (for tills also the protocol it spoke, whether it holds
  the transition prices and how many SKUs the last FINAL kept); ``devices``: each device's last known version
  and, for labels, what it is known to show (``shows``).

Columns added after the first release are in ``ADDED_COLUMNS`` (schema 2): the migration adds them to an older
database with SQLite's ADD COLUMN; release 1 ignores them, so a rollback can still use the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from storelink.system.schema import ensure_schema
from storelink.system.sqlite import Synchronous, open_db, transaction

T = TypeVar("T")
WAL_SIZE_LIMIT = 4 * 1024 * 1024  # bytes the WAL file is cut back to after a checkpoint (SQLite checkpoints at ~4 MB)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS book(
  sku TEXT PRIMARY KEY, gtin TEXT, price INTEGER NOT NULL, unit_price INTEGER, unit_basis TEXT,
  description TEXT NOT NULL, promotion TEXT) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS book_gtin ON book(gtin) WHERE gtin IS NOT NULL;
CREATE TABLE IF NOT EXISTS batches(
  batch_id TEXT PRIMARY KEY, version INTEGER, source TEXT NOT NULL, manifest TEXT, mode TEXT, currency TEXT,
  effective_at REAL, chunks_total INTEGER, chunks_done INTEGER NOT NULL DEFAULT 0, item_count INTEGER,
  phase TEXT NOT NULL, reason TEXT, received_at REAL NOT NULL, staged_at REAL, prepare_started REAL,
  changed INTEGER, decided_at REAL, committed_at REAL, last_chunk_at REAL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS batches_phase ON batches(phase);
CREATE TABLE IF NOT EXISTS raw_chunks(
  batch_id TEXT NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL, received_at REAL NOT NULL,
  PRIMARY KEY(batch_id, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunk_done(batch_id TEXT NOT NULL, idx INTEGER NOT NULL,
  PRIMARY KEY(batch_id, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staged(
  batch_id TEXT NOT NULL, sku TEXT NOT NULL, gtin TEXT, price INTEGER NOT NULL, unit_price INTEGER,
  unit_basis TEXT, description TEXT NOT NULL, promotion TEXT, PRIMARY KEY(batch_id, sku)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes(
  batch_id TEXT NOT NULL, sku TEXT NOT NULL, old_price INTEGER, new_price INTEGER, kind TEXT NOT NULL,
  PRIMARY KEY(batch_id, sku)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS changes_sku ON changes(sku);
CREATE TABLE IF NOT EXISTS transitions(batch_id TEXT PRIMARY KEY, outcome TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS targets(
  batch_id TEXT NOT NULL, device TEXT NOT NULL, role TEXT NOT NULL, state TEXT NOT NULL, error TEXT,
  updated_at REAL NOT NULL, PRIMARY KEY(batch_id, device));
CREATE TABLE IF NOT EXISTS devices(
  device TEXT PRIMARY KEY, role TEXT NOT NULL, version INTEGER, stale INTEGER NOT NULL DEFAULT 0,
  drift TEXT, updated_at REAL NOT NULL);
"""
ADDED_COLUMNS = {
    # labels_released: the first COMMIT round reached the tills, labels may change now; base_version: the version
    # a scheduled batch's diff was computed against (the book plus the batches queued before it)
    "batches": ("labels_released REAL", "base_version INTEGER"),
    # protocol: what a till spoke when it prepared; held: it charges at most the transition prices (HOLD or
    # COMMIT delivered); final_left: SKUs the last FINAL kept held (NULL: no FINAL yet); catchup: added by a
    # catch-up, its holds cover every transition open at that time
    "targets": ("protocol INTEGER", "held INTEGER NOT NULL DEFAULT 0", "final_left INTEGER",
                "catchup INTEGER NOT NULL DEFAULT 0"),
    # deadline: when labels that have not confirmed become drift; outcome gains 'drift' (only stragglers left)
    "transitions": ("deadline REAL",),
    "devices": ("shows TEXT",),  # JSON: what a label device is known to display
}


def _add_columns(conn: sqlite3.Connection) -> None:
    for table, columns in ADDED_COLUMNS.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


def _create(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    _add_columns(conn)


class PriceDb:
    def __init__(self, path: Path, synchronous: Synchronous = "FULL"):
        self.path = path
        self.synchronous = synchronous
        self._writer: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prices-db")
        self._local = threading.local()
        self._generation = 0  # bumped by close(): a thread's reader from before is replaced on its next use

    def open(self) -> None:
        """Open and create the schema (call from a worker thread or before the loop runs)."""
        self._pool.submit(self._open).result()

    def _open(self) -> None:
        # A big transaction (a chunk of several MB) grows the WAL; after a checkpoint it is cut back to this.
        conn = open_db(self.path, synchronous=self.synchronous, journal_size_limit=WAL_SIZE_LIMIT)
        # versioned (storelink.system.schema): schema 2 adds ADDED_COLUMNS, which release 1 still reads and writes
        ensure_schema(conn, "prices", _create, {2: _add_columns})
        self._writer = conn

    @property
    def is_open(self) -> bool:
        """The schema exists (open() has run and close() has not)."""
        return self._writer is not None

    def close(self) -> None:
        def _close() -> None:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

        self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)
        # Readers are not closed here: a reader belongs to its thread and may be in the middle of a query (a
        # status build in a worker thread, a LOOKUP on the loop), and closing a connection another thread is
        # using crashes the process. Each thread closes its own old reader when it next reads (reader()).
        self._generation += 1

    # -- writes -------------------------------------------------------------------------------------------
    def _in_txn(self, fn: Callable[..., T], *args: Any) -> T:
        if self._writer is None:
            raise RuntimeError("price database is not open")
        with transaction(self._writer) as conn:
            return fn(conn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) on the writer thread inside one transaction; returns after COMMIT."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._in_txn, fn, *args)

    # -- reads --------------------------------------------------------------------------------------------
    def reader(self) -> sqlite3.Connection:
        """This thread's read connection (WAL readers never wait for the writer)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.generation == self._generation:
            return conn
        if conn is not None:
            conn.close()  # opened before the last close(); this thread is its only user
        conn = open_db(self.path, synchronous=self.synchronous, read_only=True)
        self._local.conn, self._local.generation = conn, self._generation
        return conn

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(reader, *args) in a worker thread (for reads bigger than a point lookup)."""
        return await asyncio.to_thread(lambda: fn(self.reader(), *args))


def get_meta(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return str(row[0]) if row else default


def set_meta(conn: sqlite3.Connection, key: str, value: object) -> None:
    conn.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                 (key, str(value)))
