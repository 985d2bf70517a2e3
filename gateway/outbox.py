"""The durable outbox: every uplink event is on disk before anyone is told it was accepted.

One writer thread owns the write connection and commits whatever has queued up since its last commit in one
transaction (group commit): a lone event costs one fsync, a burst of a thousand costs one fsync too. A caller's
future is resolved only after COMMIT returned, and with WAL + ``synchronous=FULL`` a committed row survives
``kill -9`` and power loss. Rows are deleted only after the uplink reports the broker's PUBACK for them.

What a commit writes is kept to the event itself, because the appliance lives on an SD card (docs/appliance.md,
"Flash wear"): a lone event is one 1 KiB page of WAL. There is no secondary index (eviction walks the rowid
order from a remembered position), ``seq`` needs no counter row of its own, and deletes after PUBACK are lazy:
they ride along in the next insert commit, or after ``DELETE_DELAY`` / ``DELETE_BATCH`` go in a commit of their
own that is not fsync'd. A delete lost to a crash or a power cut only re-sends events head office drops by id.

``seq`` is per gateway, monotonic and gap-free. The next value is ``max(seq) + 1`` of the rows on disk, or the
``meta`` row's ``next_seq`` when the newest rows were deleted; that row is written only by a commit that deletes
the newest row, in the same transaction, so every state a crash can leave knows the highest seq ever used. A
rolled-back batch (disk full) gives its numbers back. The only gaps head office can ever see are telemetry
events evicted under the size cap, and those are reported exactly, in ``outbox.evicted`` events
(storelink.evictions), committed with the next insert or, when none comes, in a commit of their own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from storelink import safe_json
from storelink.config import StorageConfig
from storelink.evictions import EvictionLog, create_evicted_table
from storelink.outbox_rows import (
    Accepted,
    EventRejected,
    OutboxError,
    OutboxFull,
    OutboxRows,
    OutboxStats,
    PendingEvent,
    StoredEvent,
    iso_ts,
)
from storelink.system.logs import exception_summary
from storelink.system.schema import ensure_schema
from storelink.system.sqlite import DatabaseSettingsError, open_db, transaction

__all__ = ["Accepted", "AcceptedEvent", "EventRejected", "Listener", "Outbox", "OutboxError", "OutboxFull",
           "OutboxStats", "StoredEvent", "iso_ts", "kind_matcher"]  # the records live in outbox_rows
log = logging.getLogger(__name__)

MAX_BATCH = 2000  # events per transaction; bounds the time one commit holds the writer
MAX_EVENT_BYTES = 1024 * 1024  # one event's data as JSON; a 1000-line sale is ~100 KB
MAX_EVENT_DEPTH = safe_json.MAX_DEPTH
PAGE_SIZE = 1024  # a lone event's commit is one page of WAL (+24 bytes); a 4 KiB page would cost two disk pages
DELETE_DELAY = 1.0  # seconds a delivered event may wait for its delete when no insert commit comes along
DELETE_BATCH = 1000  # delivered events that get a delete commit of their own at once
_FLUSH = ("flush", None)  # the writer's own wake-up: delivered events have waited DELETE_DELAY


@dataclass(frozen=True, slots=True)
class AcceptedEvent:
    """What a listener hears about an accepted event (never its data: listeners show and count, they don't keep)."""

    kind: str
    device: str
    seq: int
    ts: float


Listener = Callable[[Sequence[AcceptedEvent]], None]


def kind_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    exact = {p for p in patterns if not p.endswith(".*")}
    prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))

    def is_match(kind: str) -> bool:
        return kind in exact or (bool(prefixes) and kind.startswith(prefixes))

    return is_match


def _create_tables(conn: sqlite3.Connection) -> None:
    """The outbox's schema; run once per open (ensure_schema), never per event."""
    db = sqlite_utils.Database(conn, recursive_triggers=False)  # no pragma of its own on the writer's connection
    db["outbox"].create(  # type: ignore[union-attr]
        {"seq": int, "id": str, "kind": str, "critical": int, "ts": float, "payload": bytes},
        pk="seq",
        not_null={"id", "kind", "critical", "ts", "payload"},
        if_not_exists=True,
    )
    db["meta"].create({"key": str, "value": int}, pk="key", if_not_exists=True)  # type: ignore[union-attr]
    # An index page written by every insert, which eviction no longer needs. Dropped at every open, not by a schema
    # migration: the previous release (same schema version, it reads this file as it is) creates it again.
    conn.execute("DROP INDEX IF EXISTS outbox_by_class")
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
        self.evictions = EvictionLog()  # the writer thread's: which seqs were evicted, and their reports
        self._rows = OutboxRows(config, self.stats, self._alarm, self.evictions)  # writer thread only, like _conn
        self._acked: list[int] = []  # delivered, not yet deleted (writer thread only)
        self._acked_at = 0.0  # monotonic time the oldest of them arrived
        self._new_event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_progress = time.monotonic()
        self._busy_since: float | None = None  # set while the writer holds a batch; the watchdog reads it
        self._id_prefix = os.urandom(10).hex()
        self._id_counter = itertools.count()
        self._listeners: list[Listener] = []

    # -- lifecycle ------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Open (blocking: call from a thread or before the loop runs) and start the writer thread."""
        try:
            conn = open_db(self.config.path, synchronous=self.config.synchronous, page_size=PAGE_SIZE)
        except DatabaseSettingsError as err:
            raise OutboxError(str(err)) from None
        # Versioned (storelink.system.schema): a release rolled back after an update still reads this file.
        ensure_schema(conn, "outbox", _create_tables)
        self.evictions.open(conn)
        self.stats.evicted_total = self.evictions.state.total
        row = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        top = conn.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
        self._rows.meta_seq = row[0] if row else 0
        self._rows.next_seq = max(self._rows.meta_seq, top + 1)
        depth, size, crit = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)),0), coalesce(sum(critical),0) FROM outbox"
        ).fetchone()
        self.stats.depth, self.stats.bytes, self.stats.critical = depth, size, crit
        self._conn = conn
        self._reader = open_db(self.config.path, synchronous=self.config.synchronous, read_only=True)
        self._thread = threading.Thread(target=self._writer, name="outbox-writer", daemon=True)
        self._thread.start()
        log.info("outbox open: %d events waiting, next seq %d", depth, self._rows.next_seq)

    def close(self) -> None:
        """Finish what is queued (deletes included), then close. Blocking."""
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

    def _pending(self, kind: str, device: str, data: Any) -> PendingEvent:
        # Validated here, on the caller's side of the queue: a row the writer could not encode would fail the
        # whole batch it is in (and once killed the writer thread). The caller gets the reason instead.
        for name, text in (("kind", kind), ("device", device)):
            if not isinstance(text, str) or not 1 <= len(text) <= 128 or not safe_json.text_ok(text):
                raise EventRejected(f"event {name} must be 1..128 characters of UTF-8 text")
        try:
            data_json = safe_json.dumps_text(data, max_bytes=MAX_EVENT_BYTES, max_depth=MAX_EVENT_DEPTH)
        except safe_json.JsonRejected as err:
            raise EventRejected(f"event data cannot be stored: {err.reason}") from None
        return PendingEvent(self._new_id(), time.time(), kind, device, data_json, self.is_critical(kind))

    def _new_id(self) -> str:
        # A random per-process prefix and a counter: unique across restarts and gateways like a uuid4, without
        # paying for os.urandom on every event (12 us here, a fifth of the enqueue cost).
        return f"{self._id_prefix}{next(self._id_counter):012x}"

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
        """The broker acknowledged these; delete them (lazily, batched with other work; see the module doc)."""
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
        return self._rows.next_seq - 1

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
            "next_seq": self._rows.next_seq,
            "cap": {"max_bytes": self.config.max_bytes, "max_events": self.config.max_events},
            "alarms": dict(s.alarms),
        }

    def report(self) -> dict[str, Any]:
        """Blocking: the retained ``{base}/outbox/state`` payload (contract.OutboxStatePayload)."""
        oldest = self.oldest_ts() if self._reader is not None else None
        s = self.stats
        return {"depth": s.depth, "bytes": s.bytes, "critical": s.critical,
                "oldest_undelivered_at": iso_ts(oldest) if oldest else None, "next_seq": self._rows.next_seq,
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
                item: tuple[str, Any] | None = self._queue.get(timeout=self._wait())
            except queue.Empty:
                item = _FLUSH  # a lazy delete or an eviction report is due
            self._busy_since = time.monotonic()
            puts: list[Any] = []
            n = 0
            while True:
                if item is None:
                    stop = True
                    break
                if item[0] == "put":
                    puts.append(item[1])
                    n += len(item[1][0])
                elif item[0] == "ack":
                    if not self._acked:
                        self._acked_at = time.monotonic()
                    self._acked.extend(item[1])
                if n >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                if puts or self.evictions.due():
                    self._commit(puts)  # the waiting deletes go along, in the same fsync; a report is durable
                elif self._acked and (stop or len(self._acked) >= DELETE_BATCH or self._delete_wait() == 0):
                    self._commit_deletes()
            except Exception as err:  # never let one batch end the thread: every later caller would hang
                log.error("outbox writer: a batch failed (%s); storing its calls one by one",
                          exception_summary(err))
                self._commit_singly(puts)
            self.last_progress = time.monotonic()
            self._busy_since = None

    def _delete_wait(self) -> float | None:
        """Seconds the writer may sleep before the delivered events are due for their delete."""
        if not self._acked:
            return None
        return max(0.0, self._acked_at + DELETE_DELAY - time.monotonic())

    def _wait(self) -> float | None:
        """Seconds the writer may sleep: until a lazy delete or an eviction report is due, whichever comes first."""
        waits = [w for w in (self._delete_wait(), self.evictions.wait()) if w is not None]
        return min(waits) if waits else None

    def _commit_singly(self, puts: list[Any]) -> None:
        """After an unexpected failure: the waiting deletes, then each call, each in its own transaction, so only
        the call that cannot be stored is refused (its caller gets an OutboxError) and the rest is committed."""
        if self._acked:
            try:
                self._commit_deletes()
            except Exception as err:
                log.error("outbox writer: deleting delivered rows failed (%s); they are sent again",
                          exception_summary(err))
                self._acked = []
        for put in puts:
            try:
                self._commit([put])
            except Exception as err:
                pending, fut, loop = put
                log.error("outbox writer: refused a call of %d event(s) it could not store (%s)", len(pending),
                          exception_summary(err))
                self.stats.refused_total += len(pending)
                self._resolve([((fut, loop), OutboxError(f"event could not be stored ({type(err).__name__})"))])

    def _commit_deletes(self) -> None:
        """Delete delivered events in a commit of their own, without an fsync (a lost delete only re-sends)."""
        assert self._conn is not None
        snapshot = self._rows.snapshot()
        try:
            with transaction(self._conn, durable=False) as conn:
                delivered = self._rows.delete(conn, self._acked)
                meta = self._rows.keep_seq_mark(conn)
        except sqlite3.Error as err:
            self._rows.restore(snapshot)
            self._acked_at = time.monotonic()  # tried again after DELETE_DELAY, not in a tight loop
            log.error("outbox: cannot delete %d delivered events yet: %s", len(self._acked), err)
            return
        except BaseException:
            self._rows.restore(snapshot)
            raise
        self._rows.meta_seq = meta
        self._acked = []
        self.stats.commits_total += 1
        self.stats.delivered_total += delivered

    def _commit(self, puts: list[Any]) -> None:
        assert self._conn is not None
        acks = self._acked
        snapshot = self._rows.snapshot()
        results: list[tuple[Any, list[Accepted] | BaseException]] = []
        delivered = 0
        meta = self._rows.meta_seq
        try:
            with transaction(self._conn) as conn:
                if acks:
                    delivered = self._rows.delete(conn, acks)
                fast = self._rows.insert_under_cap(conn, puts)
                if fast is not None:
                    results = fast
                else:  # near the cap: call by call, each all or nothing, evicting telemetry as it goes
                    for pending, fut, loop in puts:
                        try:
                            results.append(((fut, loop), self._rows.insert_call(conn, pending)))
                        except OutboxFull as err:
                            results.append(((fut, loop), err))
                if self.evictions.due():
                    self._rows.report_evictions(conn, self._new_id())
                self.evictions.save(conn, snapshot[5])
                if acks or self.evictions.state.total != snapshot[5].total:
                    meta = self._rows.keep_seq_mark(conn)
        except sqlite3.Error as err:
            self._rows.restore(snapshot)
            full = "full" in str(err).lower()
            reason = "disk full" if full else f"database error: {err}"
            self._alarm("storage", f"cannot write the outbox ({reason}); new events are refused")
            failure = OutboxFull(reason) if full else OutboxError(reason)
            results = [((fut, loop), failure) for _p, fut, loop in puts]
            self.stats.refused_total += sum(len(p) for p, _f, _l in puts)
            # the deletes stay waiting for the next commit; the rows are still there
        except BaseException:
            # Not a storage error (a bug, a row that cannot be built): transaction() rolled this batch back; the
            # writer retries it call by call. Nothing of it was committed, so no caller has been told anything yet.
            self._rows.restore(snapshot)
            raise
        else:
            self._rows.meta_seq = meta
            self._acked = []
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
        if not results and self._loop is not None:  # a report committed on its own: wake the drain for it
            try:
                self._loop.call_soon_threadsafe(self._new_event.set)
            except RuntimeError:
                pass


def _set_results(items: list[tuple[asyncio.Future[Any], Any]], new_event: asyncio.Event) -> None:
    for fut, result in items:
        if fut.done():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
    new_event.set()
