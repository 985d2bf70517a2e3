"""The one way StoreLink opens a SQLite database, and the one way it writes a transaction.

Every database of the gateway (the outbox, the price book, each label printer's queue, each ESL access point's
state, the kiosk journal) is opened by :func:`open_db` and written in :func:`transaction`, so they all get the
same, checked settings:

- ``journal_mode=WAL``: a commit appends its pages to the WAL and fsyncs that one file, instead of a rollback
  journal plus the database plus two fsyncs; readers never wait for the writer.
- ``synchronous``: ``FULL`` (the default) fsyncs the WAL at every commit, so a commit survives power loss;
  ``NORMAL`` survives a process crash only. It is per connection and builds differ in defaults, so it is read
  back after it is set, like the journal mode: a database that refuses either is an error, not a warning.
- ``page_size``: fixed when a database is created. A commit writes whole pages to the WAL (a 24-byte frame
  header each), so a lone small row costs one page; the outbox, whose commits are single events, asks for
  1 KiB (see docs/appliance.md, "Flash wear"). An existing database of another page size is converted once at
  open when it is small (``VACUUM``), else kept as it is.
- ``secure_delete=FAST``: the Debian build defaults to ON, which also zeroes every page a delete frees (more
  pages written); FAST zeroes deleted content only in pages that are written anyway. The kiosk journal asks
  for ON: customer data must not linger in free pages.
- ``wal_autocheckpoint`` (pages) and ``journal_size_limit`` (bytes): the WAL is copied into the database every
  1000 pages and then reused from its start, so it keeps its size (no file growth, hence no filesystem
  metadata journalled on each fsync); after a big transaction it is cut back to the limit.

:func:`transaction` is ``BEGIN IMMEDIATE`` (the write lock up front, so a writer never fails half-way on a
lock upgrade), ``COMMIT``, and ``ROLLBACK`` on any exception. ``durable=False`` commits without the fsync
(``synchronous=NORMAL`` for that one transaction): still atomic and kept through a process crash, but the
next power loss may undo it. Only for writes whose loss is harmless (the outbox's deletes after PUBACK: a lost
delete re-sends an event head office drops by id).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Synchronous = Literal["FULL", "NORMAL"]
SecureDelete = Literal["ON", "OFF", "FAST"]
_SYNC_LEVEL = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}
_SECURE_LEVEL = {"OFF": 0, "ON": 1, "FAST": 2}
CONVERT_PAGE_SIZE_MAX = 64 * 1024 * 1024  # a VACUUM of this much takes seconds on a Pi; larger ones keep theirs


class DatabaseSettingsError(RuntimeError):
    """SQLite did not take a setting the gateway relies on (WAL, the fsync level)."""


class Database(sqlite3.Connection):
    """A connection opened by :func:`open_db`; it remembers what it was opened with."""

    path: Path
    synchronous: Synchronous
    read_only: bool

    def close(self) -> None:
        with _open_lock:
            _open.discard(self)
        super().close()


_open: weakref.WeakSet[Database] = weakref.WeakSet()
_open_lock = threading.Lock()


def open_db(
    path: Path,
    *,
    synchronous: Synchronous = "FULL",
    page_size: int = 4096,
    secure_delete: SecureDelete = "FAST",
    read_only: bool = False,
    wal_autocheckpoint: int = 1000,
    journal_size_limit: int = 4 * 1024 * 1024,
    timeout: float = 30.0,
) -> Database:
    """Open ``path`` (created with its directory if missing) with WAL and the given settings, checked.

    ``read_only`` connections (``query_only``) are for reader threads; they get the same checks. Connections
    may be used from any thread (``check_same_thread=False``): each owner serialises its own use."""
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout,
                           factory=Database)
    assert isinstance(conn, Database)
    conn.path, conn.synchronous, conn.read_only = path, synchronous, read_only
    try:
        if not read_only:
            _set_page_size(conn, page_size)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise DatabaseSettingsError(f"{path}: SQLite refused WAL mode (got {mode!r})")
        _set_checked(conn, "synchronous", synchronous, _SYNC_LEVEL[synchronous])
        _set_checked(conn, "secure_delete", secure_delete, _SECURE_LEVEL[secure_delete])
        conn.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
        conn.execute(f"PRAGMA journal_size_limit={int(journal_size_limit)}")
        if read_only:
            _set_checked(conn, "query_only", "1", 1)
    except BaseException:
        conn.close()
        raise
    with _open_lock:
        _open.add(conn)
    return conn


def _set_checked(conn: Database, pragma: str, value: str, expected: int) -> None:
    conn.execute(f"PRAGMA {pragma}={value}")
    got = conn.execute(f"PRAGMA {pragma}").fetchone()[0]
    if got != expected:
        raise DatabaseSettingsError(f"{conn.path}: SQLite refused {pragma}={value} (got {got})")


def _set_page_size(conn: Database, page_size: int) -> None:
    """A new database gets ``page_size``; a small existing one of another size is rebuilt with it."""
    current = conn.execute("PRAGMA page_size").fetchone()[0]
    if current == page_size:
        return
    if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        conn.execute(f"PRAGMA page_size={int(page_size)}")  # takes effect when the first page is written
        return
    size = conn.path.stat().st_size
    if size > CONVERT_PAGE_SIZE_MAX:
        log.info("%s keeps its %d-byte pages (%d MB is too big to rebuild at start-up)", conn.path, current,
                 size // 1_000_000)
        return
    # The page size of a WAL database cannot change; VACUUM rebuilds it (atomically) under a rollback journal.
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute(f"PRAGMA page_size={int(page_size)}")
    conn.execute("VACUUM")
    log.info("%s rebuilt with %d-byte pages (was %d)", conn.path, page_size, current)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
    """``with transaction(db):`` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK and re-raise on any exception.

    ``durable=False``: this commit is not fsync'd (see the module docstring for when that is allowed)."""
    relax = not durable and getattr(conn, "synchronous", "FULL") == "FULL"
    if relax:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        if relax:
            conn.execute("PRAGMA synchronous=FULL")


def settings(conn: sqlite3.Connection) -> dict[str, Any]:
    """What SQLite says this connection runs with (for tests and diagnostics)."""
    names = {v: k for k, v in _SYNC_LEVEL.items()}
    return {
        "journal_mode": str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower(),
        "synchronous": names.get(conn.execute("PRAGMA synchronous").fetchone()[0], "?"),
        "page_size": conn.execute("PRAGMA page_size").fetchone()[0],
        "secure_delete": {v: k for k, v in _SECURE_LEVEL.items()}[conn.execute("PRAGMA secure_delete").fetchone()[0]],
        "wal_autocheckpoint": conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
        "journal_size_limit": conn.execute("PRAGMA journal_size_limit").fetchone()[0],
    }


def open_databases() -> list[Database]:
    """Every connection open_db() opened that is not closed yet."""
    with _open_lock:
        return list(_open)
