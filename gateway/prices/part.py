"""The price part as the gateway runs it: builds the pieces and runs their loops in one TaskGroup."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from storelink.prices.audit import Auditor
from storelink.prices.book import PriceBook
from storelink.prices.coordinator import Coordinator
from storelink.prices.db import PriceDb
from storelink.prices.intake import Intake
from storelink.prices.models import PricesConfig
from storelink.prices.staging import Staging
from storelink.prices.state import StatePublisher, build_state
from storelink.prices.targets import Targets
from storelink.uplink import Downlink

if TYPE_CHECKING:
    from storelink.app import Gateway

log = logging.getLogger(__name__)
EVENT_DEVICE = "prices"  # the `device` of every price.* event
# A chunk's handler waits for its turn to be decoded and stored (two at a time): the last of a 100-chunk burst on a
# slow card may wait minutes. Past this the message is acknowledged and the batch, incomplete, expires (reported).
HANDLER_TIMEOUT = 600.0


class PricesPart:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        conf = gateway.config
        self.cfg: PricesConfig = conf.prices
        path = self.cfg.path or conf.storage.path.parent / "prices.db"
        self.db = PriceDb(path, conf.storage.synchronous)
        self.ready = asyncio.Event()
        self.targets = Targets(gateway)
        self.state = StatePublisher(self.db, self._build_state,
                                    lambda body: gateway.uplink.publish_state(gateway.topics.prices_state, body))
        self.book = PriceBook(self.db, is_stale=lambda device: self.auditor.is_stale(device))
        self.staging = Staging(self.db, self.cfg, conf.store_id, list(conf.groups), list(conf.trust.public_keys))
        self.coordinator = Coordinator(self.db, self.cfg, self.targets, self.emit, self.state.mark)
        self.auditor = Auditor(self.db, self.cfg, self.book, self.coordinator, self.emit, self.state.mark)
        self.intake = Intake(self.db, self.cfg, self.staging, self.book, gateway.topics, list(conf.groups),
                             self.emit, self.state.mark, self.coordinator.wake.set)
        self.intake.rejections = gateway.rejections
        for topic, handler in self.intake.subscriptions():
            gateway.uplink.subscribe(topic, self._when_ready(handler), timeout=HANDLER_TIMEOUT)

    async def emit(self, kind: str, data: dict[str, Any]) -> Any:
        return await self.gateway.emit(kind, EVENT_DEVICE, data)

    def _when_ready(self, handler: Callable[[Downlink], Awaitable[None]]) -> Callable[[Downlink], Awaitable[None]]:
        async def wrapped(down: Downlink) -> None:
            await self.ready.wait()  # a message can arrive before the database is open
            await handler(down)

        return wrapped

    def _build_state(self, conn: Any) -> dict[str, Any]:
        devices = [(t.device, t.role) for t in self.targets.all()]
        return build_state(conn, self.gateway.config.store_id, devices, self.auditor.stale, self.auditor.drift,
                           self.coordinator.current)

    async def run(self) -> None:
        await asyncio.to_thread(self.db.open)
        await self.auditor.load()
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.state.run(), name="prices-state")
                tg.create_task(self.coordinator.run(), name="prices-coordinator")
                tg.create_task(self.auditor.run(), name="prices-audit")
                tg.create_task(self.intake.run(), name="prices-intake")
        finally:
            self.ready.clear()
            await asyncio.to_thread(self.db.close)
