"""The durable outbox: every uplink event is on disk before anyone is told it was accepted.

One writer thread owns the write connection and commits whatever has queued up since its last commit in one
transaction (group commit): a lone event costs one fsync, a burst of a thousand costs one fsync too. A caller's
future is resolved only after COMMIT returned, and with WAL + ``synchronous=FULL`` a committed row survives
``kill -9`` and power loss. Rows are deleted only when the uplink reports the broker's PUBACK for them.

``seq`` is per gateway, monotonic and gap-free: the next value lives in a ``meta`` row updated in the same
transaction as the inserts, so a rolled-back batch (disk full) gives its numbers back. The only gaps head office
can ever see are telemetry events evicted under the size cap, and those are reported exactly, in
``outbox.evicted`` events (storelink.evictions).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from storelink import safe_json
from storelink.config import StorageConfig
from storelink.contract import EventPayload
from storelink.evictions import EVICTION_KIND, EvictionLog, create_evicted_table
from storelink.system.logs import exception_summary
from storelink.system.schema import ensure_schema

log = logging.getLogger(__name__)

MAX_BATCH = 2000  # events per transaction; bounds the time one commit holds the writer
MAX_EVENT_BYTES = 1024 * 1024  # one event's data as JSON; a 1000-line sale is ~100 KB
MAX_EVENT_DEPTH = safe_json.MAX_DEPTH


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
class AcceptedEvent:
    """What a listener hears about an accepted event (never its data: listeners show and count, they don't keep)."""

    kind: str
    device: str
    seq: int
    ts: float


Listener = Callable[[Sequence[AcceptedEvent]], None]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    id: str
    kind: str
    ts: float
    payload: bytes


@dataclass(slots=True)
class _Pending:
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




def kind_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    exact = {p for p in patterns if not p.endswith(".*")}
    prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))

    def is_match(kind: str) -> bool:
        return kind in exact or (bool(prefixes) and kind.startswith(prefixes))

    return is_match


def open_database(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open with WAL and the requested fsync level, and check both took (builds differ in defaults)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise OutboxError(f"{path}: SQLite refused WAL mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    level = conn.execute("PRAGMA synchronous").fetchone()[0]
    if level != {"NORMAL": 1, "FULL": 2}[synchronous]:
        raise OutboxError(f"{path}: SQLite refused synchronous={synchronous} (got {level})")
    return conn


def _create_tables(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    db["outbox"].create(  # type: ignore[union-attr]
        {"seq": int, "id": str, "kind": str, "critical": int, "ts": float, "payload": bytes},
        pk="seq",
        not_null={"id", "kind", "critical", "ts", "payload"},
        if_not_exists=True,
    )
    db["meta"].create({"key": str, "value": int}, pk="key", if_not_exists=True)  # type: ignore[union-attr]
    conn.execute("CREATE INDEX IF NOT EXISTS outbox_by_class ON outbox(critical, seq)")
    # Additive, and made on every open (ensure_schema runs this after any migration): code that does not know the
    # table (a rollback) ignores it and reads the file as before, so the schema version stays where it is.
    create_evicted_table(conn)


class Outbox:
    def __init__(self, config: StorageConfig, *, on_alarm: Callable[[str, str | None], None] | None = None):
        self.config = config
        self.stats = OutboxStats()
        self._is_telemetry = kind_matcher(config.telemetry_kinds)
        self._on_alarm = on_alarm
        self._queue: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._next_seq = 1
        self._new_event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_progress = time.monotonic()
        self._busy_since: float | None = None  # set while the writer holds a batch; the watchdog reads it
        self._id_prefix = os.urandom(10).hex()
        self._id_counter = itertools.count()
        self._listeners: list[Listener] = []
        self.evictions = EvictionLog()  # the writer thread's: which seqs were evicted, and their reports

    # -- lifecycle ------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Open (blocking: call from a thread or before the loop runs) and start the writer thread."""
        conn = open_database(self.config.path, self.config.synchronous)
        # Versioned (storelink.system.schema): a release rolled back after an update still reads this file.
        ensure_schema(conn, "outbox", _create_tables)
        self.evictions.open(conn)
        self.stats.evicted_total = self.evictions.state.total
        row = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        top = conn.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
        self._next_seq = max(row[0] if row else 1, top + 1)
        depth, size, crit = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)),0), coalesce(sum(critical),0) FROM outbox"
        ).fetchone()
        self.stats.depth, self.stats.bytes, self.stats.critical = depth, size, crit
        self._conn = conn
        self._reader = sqlite3.connect(self.config.path, check_same_thread=False, isolation_level=None)
        self._thread = threading.Thread(target=self._writer, name="outbox-writer", daemon=True)
        self._thread.start()
        log.info("outbox open: %d events waiting, next seq %d", depth, self._next_seq)

    def close(self) -> None:
        """Finish what is queued, then close. Blocking."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        for conn in (self._conn, self._reader):
            if conn is not None:
                conn.close()
        self._conn = self._reader = None

    @property
    def writer_alive(self) -> bool:
        """The writer thread runs (False before open(), after close(), or when it died)."""
        return self._thread is not None and self._thread.is_alive()

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(events)`` on the event loop after each committed put (the status page's recent events,
        metrics). It must be quick and must not raise; an exception is logged and the put still succeeds."""
        self._listeners.append(listener)

    # -- accepting ------------------------------------------------------------------------------------------
    def is_critical(self, kind: str) -> bool:
        return not self._is_telemetry(kind)

    def _pending(self, kind: str, device: str, data: Any) -> _Pending:
        # Validated here, on the caller's side of the queue: a row the writer could not encode would fail the
        # whole batch it is in (and once killed the writer thread). The caller gets the reason instead.
        for name, text in (("kind", kind), ("device", device)):
            if not isinstance(text, str) or not 1 <= len(text) <= 128 or not safe_json.text_ok(text):
                raise EventRejected(f"event {name} must be 1..128 characters of UTF-8 text")
        try:
            data_json = safe_json.dumps_text(data, max_bytes=MAX_EVENT_BYTES, max_depth=MAX_EVENT_DEPTH)
        except safe_json.JsonRejected as err:
            raise EventRejected(f"event data cannot be stored: {err.reason}") from None
        # A random per-process prefix and a counter: unique across restarts and gateways like a uuid4, without
        # paying for os.urandom on every event (12 us here, a fifth of the enqueue cost).
        event_id = f"{self._id_prefix}{next(self._id_counter):012x}"
        return _Pending(event_id, time.time(), kind, device, data_json, self.is_critical(kind))

    async def put(self, kind: str, device: str, data: Any) -> Accepted:
        return (await self.put_many([(kind, device, data)]))[0]

    async def put_many(self, items: Sequence[tuple[str, str, Any]]) -> list[Accepted]:
        """Accept events; returns once they are committed. All or nothing for one call."""
        if self._thread is None:
            raise OutboxError("outbox is not open")
        loop = asyncio.get_running_loop()
        self._loop = loop
        pending = [self._pending(k, d, data) for k, d, data in items]
        fut: asyncio.Future[list[Accepted]] = loop.create_future()
        self._queue.put(("put", (pending, fut, loop)))
        accepted = await fut
        if self._listeners:
            self._tell([AcceptedEvent(p.kind, p.device, a.seq, p.ts) for p, a in zip(pending, accepted, strict=True)])
        return accepted

    def _tell(self, events: list[AcceptedEvent]) -> None:
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:
                log.exception("outbox listener %r failed", listener)

    def ack(self, seqs: Sequence[int]) -> None:
        """The broker acknowledged these; delete them (asynchronously, batched with other work)."""
        if seqs:
            self._queue.put(("ack", list(seqs)))

    # -- reading (uplink side) ------------------------------------------------------------------------------
    def read_after(self, seq: int, limit: int) -> list[StoredEvent]:
        """Blocking; oldest first."""
        assert self._reader is not None
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT seq, id, kind, ts, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            ).fetchall()
        return [StoredEvent(*r) for r in rows]

    def read_seqs(self, seqs: Sequence[int]) -> list[StoredEvent]:
        """Blocking; these events if they are still waiting, oldest first (retries of refused events)."""
        assert self._reader is not None
        marks = ",".join("?" * len(seqs))
        with self._read_lock:
            rows = self._reader.execute(
                f"SELECT seq, id, kind, ts, payload FROM outbox WHERE seq IN ({marks}) ORDER BY seq", list(seqs)
            ).fetchall()
        return [StoredEvent(*r) for r in rows]

    async def wait_for_new(self, max_wait: float) -> None:
        try:
            async with asyncio.timeout(max_wait):
                await self._new_event.wait()
        except TimeoutError:
            pass
        self._new_event.clear()

    def progress_probe(self) -> float:
        """For the watchdog: "now" while the writer is idle or between batches, else when its batch began.
        A writer thread that died never makes progress again."""
        if not self.writer_alive:
            return self.last_progress
        return self._busy_since or time.monotonic()

    @property
    def last_seq(self) -> int:
        """The highest seq committed so far."""
        return self._next_seq - 1

    def oldest_ts(self) -> float | None:
        assert self._reader is not None
        with self._read_lock:
            row = self._reader.execute("SELECT ts FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return row[0] if row else None

    def status(self) -> dict[str, Any]:
        oldest = self.oldest_ts() if self._reader is not None else None
        s = self.stats
        return {
            "depth": s.depth,
            "bytes": s.bytes,
            "critical": s.critical,
            "oldest_undelivered_age_s": round(time.time() - oldest, 3) if oldest else None,
            "accepted_total": s.accepted_total,
            "delivered_total": s.delivered_total,
            "evicted_total": s.evicted_total,  # since the outbox was created (durable), reported to head office
            "refused_total": s.refused_total,
            "next_seq": self._next_seq,
            "cap": {"max_bytes": self.config.max_bytes, "max_events": self.config.max_events},
            "alarms": dict(s.alarms),
        }

    def report(self) -> dict[str, Any]:
        """Blocking: the retained ``{base}/outbox/state`` payload (contract.OutboxStatePayload)."""
        oldest = self.oldest_ts() if self._reader is not None else None
        s = self.stats
        return {"depth": s.depth, "bytes": s.bytes, "critical": s.critical,
                "oldest_undelivered_at": iso_ts(oldest) if oldest else None, "next_seq": self._next_seq,
                "evicted_total": s.evicted_total, "alarms": dict(s.alarms), "ts": iso_ts(time.time())}

    # -- the writer thread ----------------------------------------------------------------------------------
    def _alarm(self, name: str, message: str | None) -> None:
        changed = self.stats.alarms.get(name) != message
        if message is None:
            self.stats.alarms.pop(name, None)
        else:
            self.stats.alarms[name] = message
        if changed:
            (log.warning if message else log.info)("outbox alarm %s: %s", name, message or "cleared")
            if self._on_alarm is not None:
                self._on_alarm(name, message)

    def _writer(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=self.evictions.wait())
            except queue.Empty:
                self._commit([])  # only the eviction report is due
                continue
            if first is None:
                break
            self._busy_since = time.monotonic()
            work = [first]
            n = len(first[1][0]) if first[0] == "put" else 0
            while n < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                work.append(item)
                if item[0] == "put":
                    n += len(item[1][0])
            try:
                self._commit(work)
            except Exception as err:  # never let one batch end the thread: every later caller would hang
                log.error("outbox writer: a batch failed (%s); storing its calls one by one",
                          exception_summary(err))
                self._commit_singly(work)
            self.last_progress = time.monotonic()
            self._busy_since = None

    def _commit_singly(self, work: list[tuple[str, Any]]) -> None:
        """After an unexpected failure: each call in its own transaction, so only the call that cannot be stored
        is refused (its caller gets an OutboxError) and everything else in the batch is committed."""
        for item in work:
            try:
                self._commit([item])
            except Exception as err:
                if item[0] != "put":
                    log.error("outbox writer: deleting delivered rows failed (%s); they are sent again",
                              exception_summary(err))
                    continue
                pending, fut, loop = item[1]
                log.error("outbox writer: refused a call of %d event(s) it could not store (%s)", len(pending),
                          exception_summary(err))
                self.stats.refused_total += len(pending)
                self._resolve([((fut, loop), OutboxError(f"event could not be stored ({type(err).__name__})"))])

    def _commit(self, work: list[tuple[str, Any]]) -> None:
        assert self._conn is not None
        conn = self._conn
        puts = [w[1] for w in work if w[0] == "put"]
        acks = [s for w in work if w[0] == "ack" for s in w[1]]
        snapshot = (self._next_seq, self.stats.depth, self.stats.bytes, self.stats.critical, self.evictions.state)
        results: list[tuple[Any, list[Accepted] | BaseException]] = []
        delivered = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            if acks:
                delivered = self._delete(conn, acks)
            fast = self._insert_under_cap(conn, puts)
            if fast is not None:
                results = fast
            else:  # near the cap: call by call, each all or nothing, evicting telemetry as it goes
                for pending, fut, loop in puts:
                    try:
                        accepted = self._insert_call(conn, pending)
                        results.append(((fut, loop), accepted))
                    except OutboxFull as err:
                        results.append(((fut, loop), err))
            if self.evictions.due():
                self._eviction_report(conn)
            self.evictions.save(conn, snapshot[4])
            conn.execute(
                "INSERT INTO meta(key, value) VALUES('next_seq', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (self._next_seq,),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._next_seq, self.stats.depth, self.stats.bytes, self.stats.critical, self.evictions.state = snapshot
            full = "full" in str(err).lower()
            reason = "disk full" if full else f"database error: {err}"
            self._alarm("storage", f"cannot write the outbox ({reason}); new events are refused")
            failure = OutboxFull(reason) if full else OutboxError(reason)
            results = [((fut, loop), failure) for _p, fut, loop in puts]
            self.stats.refused_total += sum(len(p) for p, _f, _l in puts)
            if acks:  # deletes are retried with the next batch; the rows are still there
                self._queue.put(("ack", acks))
        except BaseException:
            # Not a storage error (a bug, a row that cannot be built): undo this batch and let the caller retry
            # it call by call. Nothing of it was committed, so no caller has been told anything yet.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._next_seq, self.stats.depth, self.stats.bytes, self.stats.critical, self.evictions.state = snapshot
            raise
        else:
            self.stats.commits_total += 1
            self.stats.evicted_total = self.evictions.state.total
            self.stats.delivered_total += delivered
            self.stats.accepted_total += sum(len(r) for _f, r in results if isinstance(r, list))
            if "storage" in self.stats.alarms:
                self._alarm("storage", None)
        self._resolve(results)

    def _resolve(self, results: list[tuple[Any, list[Accepted] | BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        for (fut, loop), result in results:
            by_loop.setdefault(loop, []).append((fut, result))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_results, items, self._new_event)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
        if not results and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._new_event.set)
            except RuntimeError:
                pass

    def _row(self, p: _Pending) -> tuple[int, str, str, int, float, bytes]:
        """The row for p under the next seq (taken here; callers that do not keep the row restore it)."""
        seq = self._next_seq
        payload = EventPayload.encode(p.id, seq, iso_ts(p.ts), p.kind, p.device, p.data_json)
        self._next_seq += 1
        return (seq, p.id, p.kind, int(p.critical), p.ts, payload)

    def _count(self, events: int, size: int, critical: int) -> None:
        self.stats.depth += events
        self.stats.bytes += size
        self.stats.critical += critical

    def _insert_under_cap(self, conn: sqlite3.Connection, puts: list[Any]) -> list[Any] | None:
        """The common case: the whole batch fits under the cap, so no call can fail on its own and one INSERT
        takes every call's rows (a savepoint per call costs a third of the commit). None when it does not fit."""
        first_seq = self._next_seq
        rows: list[tuple[int, str, str, int, float, bytes]] = []
        results: list[Any] = []
        for pending, fut, loop in puts:
            first = len(rows)
            rows.extend(self._row(p) for p in pending)
            results.append(((fut, loop), [Accepted(id=r[1], seq=r[0]) for r in rows[first:]]))
        size = sum(len(r[5]) for r in rows)
        if self.stats.depth + len(rows) > self.config.max_events or self.stats.bytes + size > self.config.max_bytes:
            self._next_seq = first_seq
            return None
        self._count(len(rows), size, sum(r[3] for r in rows))
        if "capacity" in self.stats.alarms and self.stats.bytes < 0.9 * self.config.max_bytes:
            self._alarm("capacity", None)
        conn.executemany("INSERT INTO outbox(seq, id, kind, critical, ts, payload) VALUES (?,?,?,?,?,?)", rows)
        return results

    def _insert_call(self, conn: sqlite3.Connection, pending: list[_Pending]) -> list[Accepted]:
        """Insert one caller's events, all or none (a savepoint), evicting telemetry if the cap needs it."""
        conn.execute("SAVEPOINT call")
        saved = (self._next_seq, self.stats.depth, self.stats.bytes, self.stats.critical, self.evictions.state)
        try:
            rows = []
            for p in pending:
                row = self._row(p)
                self._make_room(conn, len(row[5]), p.critical, p.kind)
                self._count(1, len(row[5]), row[3])
                rows.append(row)
            conn.executemany("INSERT INTO outbox(seq, id, kind, critical, ts, payload) VALUES (?,?,?,?,?,?)", rows)
        except OutboxFull:
            conn.execute("ROLLBACK TO call")
            conn.execute("RELEASE call")
            self._next_seq, self.stats.depth, self.stats.bytes, self.stats.critical, self.evictions.state = saved
            self.stats.refused_total += len(pending)
            raise
        conn.execute("RELEASE call")
        return [Accepted(id=r[1], seq=r[0]) for r in rows]

    def _over_cap(self, extra_bytes: int) -> bool:
        c = self.config
        return self.stats.depth + 1 > c.max_events or self.stats.bytes + extra_bytes > c.max_bytes

    def _make_room(self, conn: sqlite3.Connection, size: int, critical: bool, kind: str) -> None:
        if not self._over_cap(size):
            if "capacity" in self.stats.alarms and self.stats.bytes < 0.9 * self.config.max_bytes:
                self._alarm("capacity", None)
            return
        evicted = 0
        while self._over_cap(size):
            victims = conn.execute(
                "SELECT seq, length(payload) FROM outbox WHERE critical=0 ORDER BY seq LIMIT 256"
            ).fetchall()
            if not victims:
                break
            for seq, length in victims:
                if not self._over_cap(size):
                    break
                conn.execute("DELETE FROM outbox WHERE seq=?", (seq,))
                self.evictions.note(conn, seq)
                self.stats.depth -= 1
                self.stats.bytes -= length
                evicted += 1
        if self._over_cap(size):
            if not critical:
                self._alarm("capacity", "outbox full of undelivered sales/price events; telemetry refused")
                raise OutboxFull(f"outbox full: {kind!r} refused (only critical events are accepted now)")
            # Critical events are never refused for the cap, only by a full disk.
            self._alarm("capacity", "outbox over its cap with critical events; telemetry refused")
        elif evicted:
            self._alarm("capacity", "outbox at its cap: oldest telemetry is being evicted")

    def _eviction_report(self, conn: sqlite3.Connection) -> None:
        """One outbox.evicted event with the runs not yet reported. Critical, so never evicted itself; it may put the
        outbox a little over its cap, which the next put evicts back."""
        data = self.evictions.take_report(conn)
        if data is None:
            return
        pending = _Pending(f"{self._id_prefix}{next(self._id_counter):012x}", time.time(), EVICTION_KIND, "gateway",
                           safe_json.dumps_text(data), True)
        row = self._row(pending)
        conn.execute("INSERT INTO outbox(seq, id, kind, critical, ts, payload) VALUES (?,?,?,?,?,?)", row)
        self._count(1, len(row[5]), 1)
        log.info("outbox at its cap: %d telemetry event(s) evicted since the last report (seq %d-%d); reported",
                 data["count"], data["ranges"][0][0], data["ranges"][-1][1])

    def _delete(self, conn: sqlite3.Connection, seqs: list[int]) -> int:
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


def _set_results(items: list[tuple[asyncio.Future[Any], Any]], new_event: asyncio.Event) -> None:
    for fut, result in items:
        if fut.done():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
    new_event.set()
