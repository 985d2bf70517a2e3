"""The composition root: builds the gateway from a config and runs it (docs/architecture.md).

The core is always there: the durable outbox, the MQTT uplink, the HTTP server, the device supervisor and the
systemd watchdog. Everything else is a part (storelink.parts), built by ``standard_parts`` from an explicit list
with typed constructor arguments, installed only when the config asks for it, and supervised: a part that fails
to start or crashes is logged, reported and restarted with backoff, and never stops the core or the tills.

Start order: the outbox (nothing may be accepted before it is open), the HTTP server, then the uplink, the
devices, the parts and the watchdog side by side. Stop order is the reverse of who produces events: devices and
parts first (no new events; what they emit on the way out still lands in the outbox), then HTTP, then the uplink
gets a moment to collect PUBACKs and says goodbye, then the outbox closes after committing what it holds.
Whatever was not delivered stays in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storelink import __version__
from storelink.config import GatewayConfig, RunningConfig
from storelink.contract import Topics
from storelink.devices.supervisor import DeviceServices, DeviceSupervisor
from storelink.kiosk.cart import KioskCart
from storelink.kiosk.sessions import KioskSessions
from storelink.outbox import Accepted, Outbox, iso_ts
from storelink.parts import Part, PartSupervisor
from storelink.prices.part import PricesPart
from storelink.remote.commands import Commands
from storelink.remote.config import RemoteConfig
from storelink.system.watchdog import ProgressWatchdog
from storelink.update.agent import UpdateAgent
from storelink.uplink import Uplink
from storelink.web.metrics import Metrics
from storelink.web.server import HttpServer, Rejections
from storelink.web.status_page import StatusPage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Core:
    """The always-present pieces a part may be built from."""

    config: RunningConfig
    outbox: Outbox
    uplink: Uplink
    http: HttpServer
    devices: DeviceSupervisor
    device_services: DeviceServices  # the typed views drivers get (a part that owns one puts it here)
    status: Callable[[], dict[str, Any]]
    rejections: Rejections  # input refused at a boundary, by (surface, reason): counted where it is refused

    @property
    def topics(self) -> Topics:
        return self.uplink.topics

    async def emit(self, kind: str, device: str, data: dict[str, Any]) -> Accepted:
        return await self.outbox.put(kind, device, data)


def wants_kiosk_sessions(config: GatewayConfig, devices: DeviceSupervisor) -> bool:
    """A device drives kiosk sessions (a kiosk mat), or the config enables the online cart with a [cart] table."""
    cart = "cart" in config.model_fields_set and config.cart.enabled
    return cart or any(h.driver_class.uses_kiosk_sessions for h in devices.devices.values())


def standard_parts(core: Core) -> list[Part]:
    """The gateway's parts, in start order. The one place that decides what a store runs besides its devices."""
    config = core.config.current
    prices = PricesPart(config, core.topics, core.uplink.publish_state, core.emit, core.devices, core.rejections)
    core.device_services.prices = prices.book
    update = UpdateAgent(core.config, core.uplink, core.emit)
    commands = Commands(core.config, core.uplink, core.devices, prices, core.status, {"update": update.command()},
                        core.rejections)
    parts: list[Part] = [prices, RemoteConfig(core.config, core.uplink, core.devices, core.http, core.emit),
                         commands, update]
    if wants_kiosk_sessions(config, core.devices):
        kiosk = KioskSessions(config.storage.path.parent / "kiosk", core.emit, config.storage.synchronous)
        core.device_services.kiosk = kiosk
        parts.append(kiosk)
        if config.cart.enabled:
            parts.append(KioskCart(core.config, core.uplink, kiosk, core.devices))
    parts += [StatusPage(core.config, core.status, core.outbox, commands),
              Metrics(core.status, commands, core.outbox)]
    return parts


PartsFactory = Callable[[Core], Sequence[Part]]


class Gateway:
    def __init__(self, config: GatewayConfig, *, config_path: Path | None = None,
                 parts: PartsFactory = standard_parts):
        self.running_config = RunningConfig(config, config_path)
        self.started_at = time.time()
        self.outbox = Outbox(config.storage)
        self.uplink = Uplink(config.mqtt, config.store_id, self.outbox, started_at=self.started_at,
                             groups=tuple(config.groups))
        self.topics = self.uplink.topics
        self.rejections: Rejections = collections.Counter()
        self.uplink.downlink.rejections = self.rejections
        # systemd's watchdog (WatchdogSec=30s) is pinged only while the loop turns and these parts make progress.
        self.watchdog = ProgressWatchdog()
        self.watchdog.watch("outbox-writer", 25, self.outbox.progress_probe)
        self.watchdog.watch("uplink", 25, self.uplink.progress_probe)
        self.device_services = DeviceServices(config.storage.path.parent, config.storage.synchronous, self.watchdog)
        self.device_services.rejections = self.rejections
        self.supervisor = DeviceSupervisor(
            config.device_configs, config.store_id, self.emit, self.uplink.publish_state,
            self.topics.device_state, self.device_services,
        )
        self.http = HttpServer(self.running_config, self.outbox, self.status, self.health_problems, self.rejections)
        core = Core(self.running_config, self.outbox, self.uplink, self.http, self.supervisor,
                    self.device_services, self.status, self.rejections)
        self.parts = PartSupervisor(parts(core), self._part_failed, self._part_recovered)
        for sub in self.parts.subscriptions():
            self.uplink.subscribe(sub.topic_filter, sub.handler, sub.qos, timeout=sub.timeout)
        self.http.routes = self.parts.routes()
        self.ready = asyncio.Event()
        self._stopping = False

    @property
    def config(self) -> GatewayConfig:
        """The config in force (remote config may replace it while running)."""
        return self.running_config.current

    @property
    def kiosk(self) -> KioskSessions | None:
        """The kiosk sessions part, when this store runs one."""
        return next((p for p in self.parts.parts if isinstance(p, KioskSessions)), None)

    async def emit(self, kind: str, device: str, data: dict[str, Any]) -> Accepted:
        """Accept an event for head office; returns once it is durable."""
        return await self.outbox.put(kind, device, data)

    async def _part_failed(self, name: str, error: str, restarts: int, retry_in: float) -> None:
        self.watchdog.status(f"part {name} failed: {error}")  # systemctl status shows it
        await self.emit("gateway.part_failed", "gateway",
                        {"part": name, "error": error, "restarts": restarts, "retry_in_s": round(retry_in, 1)})

    async def _part_recovered(self, name: str, restarts: int, down_s: float) -> None:
        failed = self.parts.failed()
        self.watchdog.status(f"parts failed: {', '.join(failed)}" if failed else f"store {self.config.store_id}")
        await self.emit("gateway.part_recovered", "gateway",
                        {"part": name, "restarts": restarts, "down_s": round(down_s, 1)})

    def status(self) -> dict[str, Any]:
        return {
            "store_id": self.config.store_id,
            "version": __version__,
            "started_at": iso_ts(self.started_at),
            "uptime_s": round(time.time() - self.started_at, 1),
            "state": "stopping" if self._stopping else ("running" if self.ready.is_set() else "starting"),
            "uplink": self.uplink.status(),
            "outbox": self.outbox.status(),
            "http": self.http.connections(),
            "rejections": {f"{surface}:{reason}": n for (surface, reason), n in sorted(self.rejections.items())},
            "devices": self.supervisor.status(),
            **self.parts.status(),
        }

    def health_problems(self) -> list[str]:
        problems = [] if self.outbox.writer_alive else ["outbox writer is not running"]
        problems += [f"outbox: {msg}" for name, msg in self.outbox.stats.alarms.items() if name == "storage"]
        return problems + self.parts.health()

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.to_thread(self.outbox.open)
        try:
            await self.http.start()
            tasks: list[asyncio.Task[None]] = []
            async with asyncio.TaskGroup() as tg:
                drain = tg.create_task(self.uplink.run(), name="uplink")
                tasks.append(tg.create_task(self.supervisor.run(), name="devices"))
                tasks.append(tg.create_task(self.parts.run(), name="parts"))
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
