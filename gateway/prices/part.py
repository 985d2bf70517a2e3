"""The price part as the gateway runs it: builds the pieces and runs their loops in one TaskGroup."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from storelink.config import GatewayConfig
from storelink.contract import ClockReport, PricesStatePayload, Topics
from storelink.devices.supervisor import DeviceSupervisor
from storelink.drivers.base import EventRef
from storelink.parts import BasePart, Subscription
from storelink.prices.audit import Auditor
from storelink.prices.book import PriceBook
from storelink.prices.clock import clock_state
from storelink.prices.coordinator import Coordinator
from storelink.prices.db import PriceDb
from storelink.prices.http import routes
from storelink.prices.intake import Intake
from storelink.prices.models import PricesConfig
from storelink.prices.schedule import Scheduler
from storelink.prices.settle import Settler
from storelink.prices.staging import Staging
from storelink.prices.state import StatePublisher, build_state
from storelink.prices.targets import Targets
from storelink.uplink import StatePayload
from storelink.web.server import Rejections

log = logging.getLogger(__name__)
EVENT_DEVICE = "prices"  # the `device` of every price.* event
# A chunk's handler waits for its turn to be decoded and stored (two at a time): the last of a 100-chunk burst on a
# slow card may wait minutes. Past this the message is acknowledged and the batch, incomplete, expires (reported).
HANDLER_TIMEOUT = 600.0
CLOCK_EVERY = 10.0  # seconds between looks at the clock's synchronisation

EmitFn = Callable[[str, str, dict[str, Any]], Awaitable[EventRef]]


class PricesPart(BasePart):
    name = "prices"

    def __init__(self, conf: GatewayConfig, topics: Topics, publish_state: Callable[[str, StatePayload], None],
                 emit: EmitFn, devices: DeviceSupervisor, rejections: Rejections | None = None):
        self.store_id = conf.store_id
        self._emit = emit
        self.cfg: PricesConfig = conf.prices
        path = self.cfg.path or conf.storage.path.parent / "prices.db"
        self.db = PriceDb(path, conf.storage.synchronous)
        self.ready = asyncio.Event()
        self.targets = Targets(devices)
        self.state = StatePublisher(self.db, self._build_state, lambda body: publish_state(topics.prices_state, body))
        self.book = PriceBook(self.db, is_stale=lambda device: self.auditor.is_stale(device),
                              held_back=lambda device: self.settler.held_back.get(device))
        self.staging = Staging(self.db, self.cfg, conf.store_id, list(conf.groups), list(conf.trust.public_keys))
        self.coordinator = Coordinator(self.db, self.cfg, self.targets, self.emit, self.state.mark, self._decided)
        self.scheduler = Scheduler(self.db, self.cfg, self.coordinator.journal, self.emit, self.state.mark,
                                   lambda: self.settler.wake.set())
        self.auditor = Auditor(self.db, self.cfg, self.book, self.coordinator, self.scheduler, self.emit,
                               self.state.mark)
        self.settler = Settler(self.db, self.cfg, self.coordinator.journal, self.targets, self.emit, self.state.mark,
                               self.auditor.set_label_drift)
        self.intake = Intake(self.db, self.cfg, self.staging, self.book, topics, list(conf.groups),
                             self.emit, self.state.mark, self.coordinator.wake.set, self.clock)
        self._clock: ClockReport | None = None
        if rejections is not None:
            self.intake.rejections = rejections  # the gateway's counters (status, /metrics)

    async def emit(self, kind: str, data: dict[str, Any]) -> EventRef:
        return await self._emit(kind, EVENT_DEVICE, data)

    def clock(self) -> ClockReport:
        """The clock's synchronisation, asked again at most every CLOCK_EVERY s (a cheap syscall, but asked per
        manifest). On the loop only: a change marks the state dirty (an asyncio.Event)."""
        if self._clock is None or time.time() - self._clock.checked_at > CLOCK_EVERY:
            before, self._clock = self._clock, clock_state(self.cfg.clock_synchronised)
            if before is None or before.synchronised != self._clock.synchronised:
                self.state.mark()
        return self._clock

    def _decided(self) -> None:
        self.scheduler.wake.set()
        self.settler.wake.set()

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(topic, handler, timeout=HANDLER_TIMEOUT) for topic, handler in self.intake.subscriptions()]

    def routes(self) -> list[web.RouteDef]:
        return routes(self.book, self.state, self.ready)

    def status(self) -> dict[str, Any]:
        return self.state.latest

    def _build_state(self, conn: sqlite3.Connection) -> PricesStatePayload:
        devices = [(t.device, t.role) for t in self.targets.all()]
        # (in the database thread: the last report, which _watch_clock keeps fresh on the loop)
        clock = self._clock or clock_state(self.cfg.clock_synchronised)
        return build_state(conn, self.store_id, devices, self.auditor.stale, self.auditor.drift,
                           self.coordinator.current, clock, self.settler.held_back,
                           self.settler.label_progress)

    async def start(self) -> None:
        await asyncio.to_thread(self.db.open)
        await self.auditor.load()
        self.ready.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.state.run(), name="prices-state")
            tg.create_task(self.coordinator.run(), name="prices-coordinator")
            tg.create_task(self.scheduler.run(), name="prices-scheduler")
            tg.create_task(self.settler.run(), name="prices-settler")
            tg.create_task(self.auditor.run(), name="prices-audit")
            tg.create_task(self.intake.run(), name="prices-intake")
            tg.create_task(self._watch_clock(), name="prices-clock")

    async def _watch_clock(self) -> None:
        """The page and prices/state say when the clock loses (or gains) its synchronisation."""
        while True:
            self.clock()
            await asyncio.sleep(CLOCK_EVERY)

    async def stop(self) -> None:
        self.ready.clear()
        await asyncio.to_thread(self.db.close)
