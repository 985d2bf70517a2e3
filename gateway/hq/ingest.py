"""`storelink hq ingest`: lands every store's events, availability, device and price states in a database.

Nothing lost, nothing twice:
- paho runs with manual acknowledgement: a message is acknowledged to the broker (PUBACK) only after the
  transaction holding its row has committed. A crash at any moment leaves the unacknowledged messages in the
  broker's session for this worker's client id; they come again when the worker is back (kill -9 included).
- The event `id` is the primary key (ON CONFLICT DO NOTHING), so a message delivered again after a crash, a
  reconnect or a store's own resend lands once.
- A mid belongs to one connection: acknowledgements of messages that came on an earlier connection are not sent
  (the broker sends those messages again and they are dropped as duplicates).

Scale-out: events come through an MQTT 5 shared subscription (``$share/{group}/...``), so the broker spreads them
over every worker with the same group; workers only insert, so they never wait for each other in the database.
Retained state topics are subscribed without sharing (a shared subscription gets no retained snapshot). Each
worker runs the tracker (gaps, alerts, the fleet summary) only while it holds the database lock for it, so
exactly one does at a time and another takes over when it dies.

Batching is a group commit: the writer commits whatever arrived while the previous commit ran (up to
`max_batch`), so one message costs one commit when idle and a burst costs one commit per few thousand.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from storelink.hq.config import HqConfig
from storelink.hq.connect import HqClient, PersistentSession, connect
from storelink.hq.db import Database, DatabaseError, open_database
from storelink.hq.published import Assembled, BatchAssembler, record_batch
from storelink.hq.records import Inbound, Parsed, parse, write_batch
from storelink.hq.schema import migrate
from storelink.mqtt_problems import LinkProblem

log = logging.getLogger(__name__)
HEARTBEAT = 5.0


@dataclass
class IngestSettings:
    database: str
    database_password: str | None = None  # PostgreSQL's, from hq.toml (libpq's PGPASSWORD/~/.pgpass otherwise)
    worker_id: str = field(default_factory=lambda: socket.gethostname())
    prefix: str = "storelink"
    share_group: str | None = "storelink-ingest"  # None: a plain subscription (one worker; brokers without $share)
    receive_maximum: int = 10_000  # MQTT 5: messages the broker may send before we acknowledge
    session_expiry: int = 7 * 86400  # seconds the broker keeps this worker's session (and queue) while it is away
    max_batch: int = 5000
    tracker: bool = True
    tracker_every: float = 2.0
    gap_grace: float = 60.0  # seconds a seq gap waits for late events and the store's eviction report
    price_grace: float = 10.0  # seconds of clock skew and batch transit allowed around a price change
    trusted_keys: list[Any] = field(default_factory=list)  # verify recorded price batches (public keys)

    @property
    def client_id(self) -> str:
        return f"storelink-ingest-{self.worker_id}"

    def filters(self) -> list[str]:
        p = self.prefix
        events = f"{p}/+/events/+"
        if self.share_group:
            events = f"$share/{self.share_group}/{events}"
        return [events, f"{p}/+/status", f"{p}/+/devices/+/state", f"{p}/+/prices/state", f"{p}/+/outbox/state",
                f"{p}/+/config/reported", f"{p}/+/prices/batch", f"{p}/groups/+/prices/batch"]


@dataclass
class Counters:
    received: int = 0
    inserted: int = 0
    duplicates: int = 0
    bad: int = 0
    commits: int = 0

    def add(self, other: Counters) -> None:
        self.received += other.received
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.bad += other.bad
        self.commits += 1


class IngestWorker:
    """One worker: an MQTT client feeding a writer thread, and the tracker when this worker holds its lock."""

    def __init__(self, settings: IngestSettings):
        self.s = settings
        self.client: HqClient | None = None  # with a persistent session and manual acknowledgement: connect()
        self.queue: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self.counters = Counters()
        self.stop_event = threading.Event()
        self.started_at = time.time()
        self._generation = 0
        self._gen_lock = threading.Lock()
        self._known_stores: set[str] = set()
        self._assembler = BatchAssembler(settings.trusted_keys)
        self._records: list[Assembled] = []  # completed price batches waiting for a commit
        self._unrecorded: list[tuple[Inbound, str]] = []  # downlink messages to acknowledge without a record
        self._last_heartbeat = 0.0
        self.db: Database | None = None
        self.tracker_thread: threading.Thread | None = None

    def connect(self, cfg: HqConfig) -> HqClient:
        """Connected through head office's one connection (hq.toml's broker, TLS, protocol) and subscribed, every
        filter granted; HqLinkError otherwise. The session is this worker id's: a crash leaves what it had not
        acknowledged in it, and the broker queues for it while it is away (Receive Maximum bounds a batch)."""
        session = PersistentSession(self.s.client_id, self.s.session_expiry, self.s.receive_maximum)
        client = connect(cfg, "ingest", session=session, on_message=self.on_message,
                         on_link_change=self.link_changed)
        try:
            client.subscribe_confirmed(self.s.filters())
        except BaseException:
            client.close()
            raise
        client.reconnect_delay_set(1, 30)
        self.client = client
        return client

    # -- paho's thread ----------------------------------------------------------------------------------------
    def link_changed(self, problem: LinkProblem | None) -> None:
        """On every (re)connect and disconnect: mids of the old connection become void."""
        with self._gen_lock:
            self._generation += 1
        if problem is not None and not self.stop_event.is_set():
            log.warning("broker: %s; reconnecting", problem.message)

    def on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        self.queue.put(Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._generation, bool(msg.retain)))

    # -- the writer ---------------------------------------------------------------------------------------------
    def open(self) -> None:
        self.db = open_database(self.s.database, password=self.s.database_password,
                                application=f"storelink-ingest-{self.s.worker_id}")
        before = migrate(self.db)
        if before == 0:
            log.info("database %s: schema created", self.s.database.split("@")[-1])
        if self.s.tracker:
            from storelink.hq.tracker import run_tracker

            self.tracker_thread = threading.Thread(target=run_tracker, name="tracker", daemon=True,
                                                   args=(self.s, self.stop_event))
            self.tracker_thread.start()

    def run(self) -> None:
        """Write until stop_event is set, then commit and acknowledge what has arrived by then, once, and return
        (messages still coming meanwhile stay unacknowledged: the broker keeps them for the next start)."""
        assert self.db is not None
        pending: list[Inbound] = []
        delay = 0.5
        last_round = False
        while not last_round:
            last_round = self.stop_event.is_set()
            pending = self._collect(pending)
            work = bool(pending or self._records or self._unrecorded)
            if not work:
                if not last_round:
                    self._housekeeping()
                continue
            try:
                self._commit(pending)
            except DatabaseError as err:
                # Nothing was acknowledged: the broker keeps the messages. Try again with what has come meanwhile.
                log.error("database: %s; %d message(s) unacknowledged, retrying in %.1f s", err, len(pending), delay)
                if self.stop_event.wait(delay):
                    break
                delay = min(delay * 2, 30.0)
                continue
            delay = 0.5
            pending = []
        try:
            self._heartbeat(Counters(), force=True)  # the final totals
        except DatabaseError as err:
            log.error("database: %s", err)

    def _collect(self, pending: list[Inbound]) -> list[Inbound]:
        """Store messages up to max_batch; downlink price batch messages go to the assembler on the way."""
        wait = 0.2 if self.stop_event.is_set() else 1.0
        while len(pending) < self.s.max_batch:
            try:
                m = self.queue.get(timeout=wait) if not pending and wait else self.queue.get_nowait()
            except queue.Empty:
                break
            wait = 0.0
            if m.topic.endswith("/prices/batch"):
                # An incomplete batch's messages stay with the assembler, unacknowledged, until it completes.
                done, dropped = self._assembler.add(m)
                if done is not None:
                    self._records.append(done)
                self._unrecorded += dropped
            else:
                pending.append(m)
        self._unrecorded += self._assembler.expire()
        return pending

    def _commit(self, pending: list[Inbound]) -> None:
        assert self.db is not None
        parsed: Parsed = parse(pending, self.s.prefix, self.s.worker_id)
        records, unrecorded = list(self._records), list(self._unrecorded)
        for m, why in unrecorded:
            log.warning("price batch message on %s not recorded: %s", m.topic, why)
            parsed.bad.append((m.topic, why, "", m.received_at))
        with self.db.transaction():
            inserted = write_batch(self.db, parsed, self.s.worker_id, self._known_stores)
            for rec in records:
                record_batch(self.db, rec.manifest, rec.items, source="downlink", key_id=rec.key_id,
                             published_at=min(m.received_at for m in rec.messages))
            delta = Counters(len(pending) + sum(len(r.messages) for r in records) + len(unrecorded), inserted,
                             len(parsed.events) - inserted, len(parsed.bad))
            self._heartbeat(delta, force=not pending)
        self._records, self._unrecorded = [], []
        self._known_stores |= parsed.stores
        self.counters.add(delta)
        if parsed.bad:
            log.warning("%d message(s) not ingested (kept in bad_messages); first: %s: %s", len(parsed.bad),
                        parsed.bad[0][0], parsed.bad[0][1])
        self._ack(pending + [m for m, _why in unrecorded] + [m for rec in records for m in rec.messages])

    def _ack(self, messages: list[Inbound]) -> None:
        if self.client is None:
            return
        with self._gen_lock:
            for m in messages:
                if m.qos > 0 and m.generation == self._generation:
                    self.client.ack(m.mid, m.qos)

    def _heartbeat(self, delta: Counters, *, force: bool = False) -> None:
        """This worker's row in `workers` (the dashboard's ingest view), with the totals this commit makes."""
        assert self.db is not None
        now = time.time()
        if now - self._last_heartbeat < HEARTBEAT and not force:
            return
        self._last_heartbeat = now
        c = self.counters
        self.db.execute(
            "INSERT INTO workers (worker, host, started_at, heartbeat_at, received_total, inserted_total, "
            "duplicates_total, bad_total) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (worker) DO UPDATE SET "
            "host = excluded.host, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, "
            "received_total = excluded.received_total, inserted_total = excluded.inserted_total, "
            "duplicates_total = excluded.duplicates_total, bad_total = excluded.bad_total",
            (self.s.worker_id, f"{socket.gethostname()}:{os.getpid()}", self.started_at, now,
             c.received + delta.received, c.inserted + delta.inserted, c.duplicates + delta.duplicates,
             c.bad + delta.bad))

    def _housekeeping(self) -> None:
        """Idle: keep the heartbeat fresh."""
        assert self.db is not None
        if time.time() - self._last_heartbeat < HEARTBEAT:
            return
        try:
            self._heartbeat(Counters(), force=True)
        except DatabaseError as err:
            log.error("database: %s", err)

    def close(self) -> None:
        self.stop_event.set()
        if self.tracker_thread is not None:
            self.tracker_thread.join(10)
        if self.db is not None:
            self.db.close()
