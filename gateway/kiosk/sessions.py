"""Kiosk customer sessions: everything the gateway holds for the customer at a kiosk, and its erasure.

A session starts when a customer steps on the kiosk's mat (drivers/kiosk_mat.py) and ends when they step off.
Whatever any part keeps for that customer - a cart, a loyalty number, a receipt being printed - is held here or
registered here, and when the session ends all of it is purged from memory and disk:

- values put with ``store()`` (memory) are dropped;
- values put with ``persist()`` (SQLite, for data that must survive a gateway restart mid-session) are deleted
  with ``secure_delete`` on and the WAL truncated, so the bytes are gone from the database files, not just
  unlinked from the b-tree;
- files under ``session_dir()`` and files given to ``register_file()`` are deleted;
- callbacks given to ``register_purge()`` run (a part with its own table deletes its rows there);
- listeners (``add_listener``) hear ``started``/``ended`` (the status page clears the kiosk screen).

Head office gets only anonymous ``kiosk.session_started`` / ``kiosk.session_ended`` events: the kiosk id, a
random session id, the duration and why it ended; never a customer's data. A gateway that died mid-session
finds the session in its journal at the next start, purges it and reports it ended (``reason: "restart"``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from storelink.outbox import iso_ts
from storelink.parts import BasePart
from storelink.system.schema import ensure_schema
from storelink.system.sqlite import Synchronous, open_db, transaction
from storelink.validation import is_identifier

log = logging.getLogger(__name__)

EmitFn = Callable[[str, str, dict[str, Any]], Awaitable[Any]]
PurgeFn = Callable[[], Awaitable[None] | None]


@dataclass(frozen=True)
class KioskEvent:
    kind: Literal["started", "ended"]
    kiosk_id: str
    session_id: str
    at: float
    duration_s: float | None = None
    reason: str | None = None


Listener = Callable[[KioskEvent], Awaitable[None]]


class NoActiveSession(RuntimeError):
    """Customer data offered for a kiosk nobody is standing at: refused, so it can never outlive a session."""


@dataclass
class _Session:
    session_id: str
    kiosk_id: str
    started: float
    started_mono: float
    data: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    purgers: list[PurgeFn] = field(default_factory=list)
    purge_failures: int = 0
    ending: bool = False  # being purged: no new data accepted, but not over until the purge is done


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (kiosk_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS session_data (
    kiosk_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (kiosk_id, key));
CREATE TABLE IF NOT EXISTS session_files (kiosk_id TEXT NOT NULL, path TEXT NOT NULL);
"""


class KioskSessions(BasePart):
    """The kiosk part (installed when a device needs kiosk sessions, or the config has a [cart]); devices see it
    as their DeviceContext.kiosk."""

    name = "kiosk"

    def __init__(self, data_dir: Path, emit: EmitFn, synchronous: Synchronous = "FULL"):
        self.data_dir = data_dir
        self.db_path = data_dir / "kiosk.db"
        self.synchronous: Synchronous = synchronous
        self._emit = emit
        self._sessions: dict[str, _Session] = {}
        self._listeners: list[Listener] = []
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        self._ready = asyncio.Event()
        self._locks: dict[str, asyncio.Lock] = {}
        self.ended_total = 0

    # -- life cycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.open()

    async def stop(self) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the journal and purge whatever a previous process left behind (it died mid-session)."""
        await asyncio.to_thread(self._open_db)
        leftovers = await asyncio.to_thread(self._query, "SELECT kiosk_id, session_id, started FROM sessions")
        for kiosk_id, session_id, started in leftovers:
            session = _Session(session_id, kiosk_id, started, time.monotonic())
            files = await asyncio.to_thread(self._query, "SELECT path FROM session_files WHERE kiosk_id=?",
                                            (kiosk_id,))
            session.files = [Path(f) for (f,) in files]
            await self._purge(session)
            await self._announce_end(session, None, "restart")
        stray = self.data_dir / "sessions"
        if stray.exists():  # files of sessions that never made it into the journal
            await asyncio.to_thread(shutil.rmtree, stray, True)
        self._ready.set()

    async def close(self) -> None:
        """End every open session (purging it) and close the journal."""
        for kiosk_id in list(self._sessions):
            await self.session_ended(kiosk_id, reason="gateway_stopping")
        self._ready.clear()
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- sessions -------------------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """``await listener(KioskEvent)`` on every start and end (after the purge, for ends)."""
        self._listeners.append(listener)

    def active(self, kiosk_id: str) -> bool:
        """A customer is at the kiosk: a session is open and not ending. (Its purge may still be running after
        this turns False; ``status()["sessions"]`` lists a kiosk until its purge is complete.)"""
        s = self._sessions.get(kiosk_id)
        return s is not None and not s.ending

    def session_id(self, kiosk_id: str) -> str | None:
        s = self._sessions.get(kiosk_id)
        return s.session_id if s and not s.ending else None

    async def session_started(self, kiosk_id: str) -> str:
        """Start a session at ``kiosk_id`` (idempotent: an open session is kept). Returns the session id."""
        if not is_identifier(kiosk_id):
            raise ValueError(f"kiosk id {kiosk_id!r} is not a valid device id")
        async with asyncio.timeout(60):
            await self._ready.wait()
        async with self._lock(kiosk_id):
            existing = self._sessions.get(kiosk_id)
            if existing is not None:
                return existing.session_id
            session = _Session(uuid.uuid4().hex, kiosk_id, time.time(), time.monotonic())
            await asyncio.to_thread(self._execute, "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)",
                                    (kiosk_id, session.session_id, session.started))
            self._sessions[kiosk_id] = session
        log.info("kiosk %s: session started", kiosk_id, extra={"device": kiosk_id})
        await self._notify(KioskEvent("started", kiosk_id, session.session_id, session.started))
        await self._emit("kiosk.session_started", kiosk_id,
                         {"kiosk": kiosk_id, "session": session.session_id, "started_at": iso_ts(session.started)})
        return session.session_id

    async def session_ended(self, kiosk_id: str, reason: str = "stepped_off") -> None:
        """End the session at ``kiosk_id`` and purge all its data (idempotent: no session, nothing to do)."""
        async with self._lock(kiosk_id):
            session = self._sessions.get(kiosk_id)
            if session is None:
                return
            session.ending = True
            try:
                await self._purge(session)
            finally:
                del self._sessions[kiosk_id]
        duration = round(time.monotonic() - session.started_mono, 3)
        await self._announce_end(session, duration, reason)

    # -- customer data --------------------------------------------------------------------------------------
    def store(self, kiosk_id: str, key: str, value: Any) -> None:
        self._session(kiosk_id).data[key] = value

    def get(self, kiosk_id: str, key: str, default: Any = None) -> Any:
        s = self._sessions.get(kiosk_id)
        return default if s is None or s.ending else s.data.get(key, default)

    async def persist(self, kiosk_id: str, key: str, value: Any) -> None:
        """Keep a JSON value on disk for this session (survives a restart mid-session; purged at the end)."""
        self._session(kiosk_id)
        await asyncio.to_thread(self._execute, "INSERT OR REPLACE INTO session_data VALUES (?, ?, ?)",
                                (kiosk_id, key, json.dumps(value)))

    async def load(self, kiosk_id: str, key: str, default: Any = None) -> Any:
        rows = await asyncio.to_thread(self._query, "SELECT value FROM session_data WHERE kiosk_id=? AND key=?",
                                       (kiosk_id, key))
        return json.loads(rows[0][0]) if rows else default

    def session_dir(self, kiosk_id: str) -> Path:
        """A private directory for this session's files (receipt images, exports); deleted at the end."""
        s = self._session(kiosk_id)
        path = self.data_dir / "sessions" / s.session_id
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    async def register_file(self, kiosk_id: str, path: Path) -> None:
        """A file elsewhere that holds this customer's data; deleted when the session ends (also after a crash:
        the path is journalled)."""
        self._session(kiosk_id).files.append(Path(path))
        await asyncio.to_thread(self._execute, "INSERT INTO session_files VALUES (?, ?)", (kiosk_id, str(path)))

    def register_purge(self, kiosk_id: str, purge: PurgeFn) -> None:
        """Run ``purge()`` (sync or async) when the session ends: for data a part keeps in its own store."""
        self._session(kiosk_id).purgers.append(purge)

    def status(self) -> dict[str, Any]:
        return {"sessions": {k: {"since": iso_ts(s.started), "ending": s.ending} for k, s in self._sessions.items()},
                "ended_total": self.ended_total}

    # -- internals ------------------------------------------------------------------------------------------
    def _session(self, kiosk_id: str) -> _Session:
        s = self._sessions.get(kiosk_id)
        if s is None or s.ending:
            raise NoActiveSession(f"no customer session at kiosk {kiosk_id!r}")
        return s

    def _lock(self, kiosk_id: str) -> asyncio.Lock:
        return self._locks.setdefault(kiosk_id, asyncio.Lock())

    async def _purge(self, session: _Session) -> None:
        """Erase everything of ``session``. Each step runs even if an earlier one failed; failures are logged
        (without the data) and counted in the end event, so a purge that did not complete is visible."""
        failures = 0
        session.data.clear()
        for purge in session.purgers:
            try:
                result = purge()
                if inspect.isawaitable(result):
                    await result
            except Exception as err:
                failures += 1
                log.error("kiosk %s: a purge callback failed: %s", session.kiosk_id, type(err).__name__)
        session.purgers.clear()
        for path in [*session.files, self.data_dir / "sessions" / session.session_id]:
            try:
                if path.is_dir():
                    await asyncio.to_thread(shutil.rmtree, path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as err:
                failures += 1
                log.error("kiosk %s: could not delete a session file: %s", session.kiosk_id, err.strerror)
        try:
            await asyncio.to_thread(self._erase_rows, session.kiosk_id)
        except sqlite3.Error as err:
            failures += 1
            log.error("kiosk %s: could not erase session rows: %s", session.kiosk_id, err)
        session.purge_failures = failures

    async def _announce_end(self, session: _Session, duration: float | None, reason: str) -> None:
        self.ended_total += 1
        failures = session.purge_failures
        log.info("kiosk %s: session ended (%s), customer data purged%s", session.kiosk_id, reason,
                 f" with {failures} failures" if failures else "", extra={"device": session.kiosk_id})
        await self._notify(KioskEvent("ended", session.kiosk_id, session.session_id, time.time(), duration, reason))
        await self._emit("kiosk.session_ended", session.kiosk_id,
                         {"kiosk": session.kiosk_id, "session": session.session_id, "duration_s": duration,
                          "reason": reason, "purge_failures": failures})

    async def _notify(self, event: KioskEvent) -> None:
        for listener in list(self._listeners):
            try:
                await listener(event)
            except Exception:
                log.exception("kiosk listener %r failed on %s", listener, event.kind)

    def _open_db(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Deleted content is overwritten with zeros instead of left in free pages for a forensic tool.
        conn = open_db(self.db_path, synchronous=self.synchronous, secure_delete="ON")
        ensure_schema(conn, "kiosk", lambda c: c.executescript(_SCHEMA))  # versioned: see storelink.system.schema
        with self._db_lock:
            self._db = conn

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        with self._db_lock:
            if self._db is None:
                raise RuntimeError("kiosk sessions are closed")
            self._db.execute(sql, params)

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._db_lock:
            if self._db is None:
                raise RuntimeError("kiosk sessions are closed")
            return list(self._db.execute(sql, params))

    def _erase_rows(self, kiosk_id: str) -> None:
        with self._db_lock:
            if self._db is None:
                raise sqlite3.ProgrammingError("kiosk sessions are closed")
            with transaction(self._db) as db:
                db.execute("DELETE FROM session_data WHERE kiosk_id=?", (kiosk_id,))
                db.execute("DELETE FROM session_files WHERE kiosk_id=?", (kiosk_id,))
                db.execute("DELETE FROM sessions WHERE kiosk_id=?", (kiosk_id,))
            # The WAL still holds the pages as they were before the delete: copy the zeroed pages into the
            # database and truncate the WAL so no earlier version of the rows is left in either file.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

