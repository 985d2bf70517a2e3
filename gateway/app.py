"""The composition root: builds the gateway's parts from a config and runs them in one TaskGroup.

Start order: the outbox (nothing may be accepted before it is open), the HTTP server, then the uplink, the
device supervisor and the other parts. Stop order is the reverse of who produces events: devices and HTTP first
(no new events), then the uplink gets a moment to collect PUBACKs and says goodbye, then the outbox closes
after committing what it holds. Whatever was not delivered stays in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from storelink import __version__
from storelink.config import GatewayConfig
from storelink.devices.supervisor import DeviceSupervisor
from storelink.outbox import Accepted, Outbox, iso_ts
from storelink.system.watchdog import ProgressWatchdog
from storelink.uplink import Uplink
from storelink.web.server import HttpServer

log = logging.getLogger(__name__)

PartRunner = Callable[[], Coroutine[Any, Any, None]]

# Modules with an `install(gateway: Gateway) -> None` that adds a part (services, MQTT handlers, HTTP routes,
# status sections, background tasks). One line each; the order is the start order.
PART_INSTALLERS: list[str] = [
    "storelink.prices",
    "storelink.remote.config",
    "storelink.kiosk.sessions",
    "storelink.remote.commands",
    "storelink.web.status_page",
    "storelink.kiosk.cart",
]


class Gateway:
    def __init__(self, config: GatewayConfig, *, config_path: Path | None = None):
        self.config = config
        self.config_path = config_path
        self.started_at = time.time()
        self.outbox = Outbox(config.storage)
        self.uplink = Uplink(config.mqtt, config.store_id, self.outbox, started_at=self.started_at,
                             groups=tuple(config.groups))
        self.topics = self.uplink.topics
        # Named services drivers and parts can look up (the price book registers itself as "prices").
        self.services: dict[str, Any] = {"gateway": self, "outbox": self.outbox, "uplink": self.uplink}
        self.http_extensions: list[Callable[[web.Application], None]] = []
        self.status_parts: dict[str, Callable[[], Any]] = {}
        self.parts: list[tuple[str, PartRunner]] = []
        self.supervisor = DeviceSupervisor(
            config.device_configs, config.store_id, self.emit, self.uplink.publish_state,
            self.topics.device_state, self.services,
        )
        self.http = HttpServer(self)
        # systemd's watchdog (WatchdogSec=30s) is pinged only while the loop turns and these parts make progress.
        self.watchdog = ProgressWatchdog()
        self.services["watchdog"] = self.watchdog  # drivers put their threads under it (DeviceContext.watch_thread)
        self.watchdog.watch("outbox-writer", 25, self.outbox.progress_probe)
        self.watchdog.watch("uplink", 25, self.uplink.progress_probe)
        self.ready = asyncio.Event()
        self._stopping = False
        for module in PART_INSTALLERS:
            importlib.import_module(module).install(self)

    async def emit(self, kind: str, device: str, data: dict[str, Any]) -> Accepted:
        """Accept an event for head office; returns once it is durable."""
        return await self.outbox.put(kind, device, data)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "store_id": self.config.store_id,
            "version": __version__,
            "started_at": iso_ts(self.started_at),
            "uptime_s": round(time.time() - self.started_at, 1),
            "state": "stopping" if self._stopping else ("running" if self.ready.is_set() else "starting"),
            "uplink": self.uplink.status(),
            "outbox": self.outbox.status(),
            "devices": self.supervisor.status(),
        }
        for name, part in self.status_parts.items():
            try:
                out[name] = part()
            except Exception as err:  # one broken part must not hide the rest of the status
                out[name] = {"error": str(err)}
        return out

    def health_problems(self) -> list[str]:
        problems = []
        if self.outbox._thread is None or not self.outbox._thread.is_alive():
            problems.append("outbox writer is not running")
        problems += [f"outbox: {msg}" for name, msg in self.outbox.stats.alarms.items() if name == "storage"]
        return problems

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.to_thread(self.outbox.open)
        try:
            await self.http.start()
            tasks: list[asyncio.Task[None]] = []
            async with asyncio.TaskGroup() as tg:
                drain = tg.create_task(self.uplink.run(), name="uplink")
                tasks.append(tg.create_task(self.supervisor.run(), name="devices"))
                for name, runner in self.parts:
                    tasks.append(tg.create_task(runner(), name=name))
                tasks.append(tg.create_task(self.watchdog.run(), name="watchdog"))
                self.ready.set()
                self.watchdog.ready(f"store {self.config.store_id}")
                log.info("gateway %s running (store %s)", __version__, self.config.store_id)
                await stop.wait()
                self._stopping = True
                self.watchdog.stopping()
                log.info("stopping")
                for task in tasks:
                    task.cancel()
                # Let drivers and parts finish their cancellation first: what they emit on the way out (a kiosk
                # session ended, a device offline) is then in the outbox before the uplink's last flush.
                await asyncio.wait(tasks, timeout=5)
                await self.http.stop()
                await self.uplink.stop(drain)
        finally:
            await self.http.stop()
            await asyncio.to_thread(self.outbox.close)
            log.info("stopped; %d events left in the outbox for the next start", self.outbox.stats.depth)
