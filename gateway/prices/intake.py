"""MQTT intake for price batches and the desired version.

Handlers are called by the uplink (one task per message; QoS 1 is acknowledged after the handler returns, so a
chunk is on disk before the broker forgets it). CPU work (base64, zlib, item validation) runs in worker threads;
SQLite work on the price database's writer thread; the asyncio loop only routes.

A batch scheduled for later (``effective_at``) is refused (``clock_not_synchronised``) while the store's clock is
not synchronised: the tills switch at effective_at by this clock. ``prices/desired`` and the batch travel on
different topics, so a desired version ahead of the store waits ``resend_grace`` seconds for its batch before a
resend is asked (the first batch of a fresh store would otherwise race its own desired version).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from storelink import safe_json
from storelink.contract import ClockReport, Topics
from storelink.downlink import Downlink
from storelink.prices.book import PriceBook
from storelink.prices.db import PriceDb
from storelink.prices.models import IN_PROGRESS, ChunkMessage, Desired, Manifest, PricesConfig, Reason
from storelink.prices.staging import Outcome, Rejected, Staging, _loads_object, decode_chunk

log = logging.getLogger(__name__)
Emit = Callable[[str, dict[str, Any]], Awaitable[Any]]


class Intake:
    def __init__(self, db: PriceDb, cfg: PricesConfig, staging: Staging, book: PriceBook, topics: Topics,
                 groups: list[str], emit: Emit, on_change: Callable[[], None], on_complete: Callable[[], None],
                 clock: Callable[[], ClockReport]):
        self.db = db
        self.cfg = cfg
        self.staging = staging
        self.book = book
        self.topics = topics
        self.sources = {topics.prices_batch: "store"} | {topics.group_prices_batch(g): f"group:{g}" for g in groups}
        self.emit = emit
        self.on_change = on_change
        self.on_complete = on_complete
        self.clock = clock
        self._route = asyncio.Lock()
        # Chunks arrive in a burst; decoding them all at once would hold every item in memory while they queue
        # for the single writer. Two at a time keeps the CPU and the writer busy and memory flat.
        self._decoding = asyncio.Semaphore(2)  # manifest acceptance vs. parking a chunk that arrived first
        self._reported: OrderedDict[tuple[str | None, str], None] = OrderedDict()
        self.desired: Desired | None = None
        self._asked: tuple[int, float] | None = None
        self._behind_since: tuple[int, float] | None = None  # (desired version, monotonic) first seen ahead
        self._recheck: asyncio.Task[None] | None = None
        self.last_chunk_at: float | None = None  # monotonic; the bench measures from here
        self.rejected_total = 0
        self.rejections: collections.Counter[tuple[str, str]] = collections.Counter()  # the gateway's, by the part

    def subscriptions(self) -> list[tuple[str, Callable[[Downlink], Awaitable[None]]]]:
        out: list[tuple[str, Callable[[Downlink], Awaitable[None]]]] = [(t, self.on_batch) for t in self.sources]
        return [*out, (self.topics.prices_desired, self.on_desired)]

    # -- batches ------------------------------------------------------------------------------------------
    async def on_batch(self, down: Downlink) -> None:
        source = self.sources.get(down.topic, "unknown")
        from_chunk = False
        try:
            obj = _loads_object(down.payload)
            kind = obj.get("type")
            if kind == "manifest":
                await self._manifest(down.payload, source)
            elif kind == "chunk":
                from_chunk = True
                await self._chunk(self.staging.parse_chunk(down.payload), time.time())
            else:
                raise Rejected(Reason.MALFORMED, f"unknown message type {safe_json.echo(kind)} (expected manifest "
                               "or chunk)", obj.get("batch_id"))
        except Rejected as rej:
            await self.reject(rej, source, from_chunk)

    async def reject(self, rej: Rejected, source: str, from_chunk: bool) -> None:
        self.rejected_total += 1
        self.rejections["price", str(rej.reason)] += 1
        await self.db.write(self.staging.record_rejection, rej, source, from_chunk)
        key = (rej.batch_id, f"{rej.reason}:{rej.detail}")
        # The detail may quote the message (a field name, a type): it goes to head office in the event, not into
        # the log. An unsigned message's batch id is only an identifier-shaped string someone chose.
        log.warning("price batch %s rejected: %s (details in the price.rejected event)",
                    rej.batch_id or "?", rej.reason)
        if key in self._reported:
            return  # the same bad message again (a redelivery): reported once is enough
        self._reported[key] = None
        while len(self._reported) > 256:
            self._reported.popitem(last=False)
        await self.emit("price.rejected", {"batch_id": rej.batch_id, "version": rej.version, "reason": str(rej.reason),
                                           "detail": rej.detail, "source": source,
                                           "active_version": self.book.active_version})
        self.on_change()

    async def _manifest(self, payload: bytes, source: str) -> None:
        manifest, raw = await asyncio.to_thread(self.staging.check_manifest, payload, source)
        if manifest.effective_at is not None and manifest.effective_at.timestamp() > time.time():
            clock = self.clock()
            if not clock.synchronised:
                raise Rejected(Reason.CLOCK, f"scheduled for {manifest.effective_at.isoformat()}, but this store's "
                               f"clock is not known to be synchronised ({clock.detail}): refusing to schedule",
                               manifest.batch_id, manifest.version)
        async with self._route:
            outcome: Outcome = await self.db.write(self.staging.accept_manifest, manifest, raw, source)
            parked = (await self.db.write(self.staging.take_parked, manifest.batch_id)
                      if outcome.accepted_manifest else [])
        if outcome.duplicate:
            log.info("batch %s: manifest received again; already in progress", manifest.batch_id)
            return
        log.info("batch %s (version %d, %d items in %d chunks) accepted for staging", manifest.batch_id,
                 manifest.version, manifest.item_count, len(manifest.chunks))
        self.on_change()
        for chunk in parked:
            try:
                await self._store(manifest, chunk, time.time())
            except Rejected as rej:
                await self.reject(rej, source, True)
                return

    async def _chunk(self, chunk: ChunkMessage, received_at: float) -> None:
        async with self._route:
            manifest, phase = await self.db.read(self.staging.chunk_target, chunk)
            if manifest is None:
                await self.db.write(self.staging.park_chunk, chunk)
                return
        if phase != "staging":
            return  # a redelivered chunk of a batch that is complete, finished or rejected
        await self._store(manifest, chunk, received_at)

    async def _store(self, manifest: Manifest, chunk: ChunkMessage, received_at: float) -> None:
        if chunk.index >= len(manifest.chunks):
            raise Rejected(Reason.MALFORMED, f"chunk {chunk.index} but the manifest lists {len(manifest.chunks)}",
                           manifest.batch_id, manifest.version)
        ref = manifest.chunks[chunk.index]
        async with self._decoding:
            try:
                rows = await asyncio.to_thread(decode_chunk, chunk.data, manifest.encoding, ref.sha256, ref.items,
                                               chunk.index, manifest.batch_id)
            except Rejected as rej:
                rej.batch_id, rej.version = manifest.batch_id, manifest.version
                raise
            complete = await self.db.write(self.staging.store_chunk, manifest.batch_id, chunk.index, rows,
                                           received_at)
            del rows
        self.last_chunk_at = time.monotonic()
        if complete:
            log.info("batch %s: all %d chunks staged", manifest.batch_id, len(manifest.chunks))
            self.on_complete()
        self.on_change()

    # -- desired version ----------------------------------------------------------------------------------
    async def on_desired(self, down: Downlink) -> None:
        if not down.payload:
            self.desired = None  # head office cleared it
            return
        try:
            self.desired = Desired.model_validate(safe_json.loads(down.payload))
        except safe_json.JsonRejected as err:
            await self.reject(Rejected(Reason.MALFORMED, f"prices/desired: not JSON: {err.reason}"),
                              "desired", False)
            return
        except ValidationError as err:
            await self.reject(Rejected(Reason.MALFORMED, f"prices/desired: {err.errors()[0]['msg']}"), "desired",
                              False)
            return
        await self.check_behind()

    async def check_behind(self) -> None:
        """Ask head office to resend when the desired version is newer than anything this store has or stages."""
        d = self.desired
        if d is None:
            return
        newest = await self.db.read(lambda c: c.execute(
            f"SELECT MAX(version) FROM batches WHERE phase IN ({','.join('?' * len(IN_PROGRESS))})",
            IN_PROGRESS).fetchone()[0])
        have = max(self.book.active_version, int(newest or 0))
        if d.version <= have:
            self._behind_since = None
            return
        now = time.monotonic()
        if self._behind_since is None or self._behind_since[0] != d.version:
            self._behind_since = (d.version, now)
        waited = now - self._behind_since[1]
        if waited < self.cfg.resend_grace:
            # its batch may be on the way (another topic): look again once the grace is over
            if self._recheck is None or self._recheck.done():
                self._recheck = asyncio.create_task(self._check_later(self.cfg.resend_grace - waited))
            return
        if self._asked is not None and self._asked[0] == d.version and now - self._asked[1] < self.cfg.resend_every:
            return
        self._asked = (d.version, now)
        log.info("head office wants price version %d, this store has %d: asking for a resend", d.version, have)
        await self.emit("price.resend_requested", {"active_version": self.book.active_version,
                                                   "desired_version": d.version, "desired_batch_id": d.batch_id})

    async def _check_later(self, delay: float) -> None:
        await asyncio.sleep(delay + 0.05)
        self._recheck = None
        try:
            await self.check_behind()
        except Exception:
            log.exception("price resend check failed")

    async def run(self) -> None:
        """Housekeeping: drop batches that never completed; keep asking while behind."""
        try:
            while True:
                await asyncio.sleep(min(60.0, self.cfg.resend_every / 2))
                try:
                    for bid in await self.db.write(self.staging.expire):
                        await self.reject(Rejected(Reason.MALFORMED, "incomplete: not every chunk arrived in time",
                                                   bid), "store", False)
                    await self.check_behind()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("price intake housekeeping failed")
        finally:
            if self._recheck is not None:
                self._recheck.cancel()
