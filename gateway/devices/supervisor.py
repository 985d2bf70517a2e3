"""Runs every configured device driver, restarts the ones that fail, and reports their health.

A driver that raises is marked offline with its error, published retained on its device state topic, and
started again after an exponential backoff with jitter; it can never take the gateway down.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storelink.contract import DeviceStatePayload
from storelink.devices.registry import load_driver
from storelink.drivers.base import (
    DeviceConfig,
    Driver,
    EventRef,
    Health,
    KioskView,
    PriceBookView,
    SyncMode,
    plain_error,
)
from storelink.outbox import iso_ts
from storelink.system.watchdog import ProgressWatchdog
from storelink.uplink import StatePayload, backoff_delay

log = logging.getLogger(__name__)
# last_seen moves with every scan; the retained state carries it, refreshed at most this often.
SEEN_REPUBLISH_S = 60.0
INTERNAL_ERROR = "stopped on an internal error; it restarts by itself (details in the gateway's log)"

EmitFn = Callable[[str, str, dict[str, Any]], Awaitable[EventRef]]
StateFn = Callable[[str, StatePayload], None]


@dataclass
class DeviceServices:
    """What the gateway lends every driver through its DeviceContext: typed, and never the gateway itself.
    The parts that own a view put it here when they are installed (app.standard_parts)."""

    data_dir: Path
    storage_sync: SyncMode
    watchdog: ProgressWatchdog
    prices: PriceBookView | None = None
    kiosk: KioskView | None = None
    rejections: collections.Counter[tuple[str, str]] | None = None  # refused input by (surface, reason): status


class DeviceHandle:
    """One device's context (what the driver sees) and its health record (what the status page sees)."""

    def __init__(self, supervisor: DeviceSupervisor, config: DeviceConfig, store_id: str):
        self._sup = supervisor
        self.config = config
        self.driver_class = load_driver(config.driver)  # validated with this same (cached) class
        self.store_id = store_id
        self.device_id = config.id
        self.state = Health.OFFLINE
        self.last_error: str | None = None
        self.last_seen: float | None = None
        self.since = time.time()
        self.restarts = 0
        self.next_start: float | None = None  # when a failed driver is started again (backoff)
        self.state_published_at: float | None = None
        self.driver: Driver | None = None
        self.task: asyncio.Task[None] | None = None
        self.run_task: asyncio.Task[None] | None = None
        self.restart_requested = False
        self.last_crash: str | None = None  # the last internal error logged with its traceback

    # DeviceContext ---------------------------------------------------------------------------------------
    async def emit(self, kind: str, data: dict[str, Any]) -> EventRef:
        return await self._sup.emit(kind, self.device_id, data)

    def set_health(self, state: Health, error: str | None = None) -> None:
        changed = state != self.state or error != self.last_error
        if state != self.state:
            self.since = time.time()
        self.state = state
        self.last_error = error
        if changed:
            (log.info if state == Health.OK else log.warning)(
                "device %s is %s%s", self.device_id, state.value, f": {error}" if error else "",
                extra={"device": self.device_id},
            )
            self._sup.publish_state(self)

    def seen(self) -> None:
        self.last_seen = now = time.time()
        if self.state_published_at is None or now - self.state_published_at >= SEEN_REPUBLISH_S:
            self._sup.publish_state(self)

    @property
    def data_dir(self) -> Path:
        return self._sup.services.data_dir

    @property
    def storage_sync(self) -> SyncMode:
        return self._sup.services.storage_sync

    @property
    def prices(self) -> PriceBookView | None:
        return self._sup.services.prices

    @property
    def kiosk(self) -> KioskView | None:
        return self._sup.services.kiosk

    @property
    def rejections(self) -> collections.Counter[tuple[str, str]] | None:
        """The gateway's counters of refused input (not part of DeviceContext: drivers count through
        storelink.drivers.till_protocol.count_rejection, which does without them)."""
        return self._sup.services.rejections

    def watch_thread(self, name: str, max_silence: float) -> Callable[[], None]:
        watchdog = self._sup.services.watchdog
        part = f"device {self.device_id} {name}"
        watchdog.unregister(part)  # a restarted driver registers its new thread under the same name
        return watchdog.register(part, max_silence)

    def unwatch_thread(self, name: str) -> None:
        self._sup.services.watchdog.unregister(f"device {self.device_id} {name}")

    # reporting -------------------------------------------------------------------------------------------
    def state_payload(self) -> DeviceStatePayload:
        return DeviceStatePayload(
            device=self.device_id,
            driver=self.config.driver,
            state=self.state.value,
            last_error=self.last_error,
            last_seen=iso_ts(self.last_seen) if self.last_seen else None,
            since=iso_ts(self.since),
        )


class DeviceSupervisor:
    def __init__(self, configs: list[DeviceConfig], store_id: str, emit: EmitFn, publish: StateFn,
                 state_topic: Callable[[str], str], services: DeviceServices,
                 backoff: tuple[float, float] = (1.0, 60.0)):
        self.emit = emit
        self._publish = publish
        self._state_topic = state_topic
        self.services = services
        self.backoff = backoff
        self.store_id = store_id
        self.devices = {c.id: DeviceHandle(self, c, store_id) for c in configs if c.enabled}
        self._tg: asyncio.TaskGroup | None = None

    def publish_state(self, handle: DeviceHandle) -> None:
        handle.state_published_at = time.time()
        self._publish(self._state_topic(handle.device_id), handle.state_payload())

    def status(self) -> list[dict[str, Any]]:
        return [self._status_of(h) for h in self.devices.values()]

    @staticmethod
    def _status_of(handle: DeviceHandle) -> dict[str, Any]:
        out = handle.state_payload().model_dump() | {"restarts": handle.restarts,
                                  "next_start": iso_ts(handle.next_start) if handle.next_start else None}
        if handle.driver is not None:
            try:
                out["details"] = handle.driver.details()
            except Exception as err:  # a driver's broken report must not break the status page
                out["details"] = {"error": plain_error(err)}
        return out

    def driver(self, device_id: str) -> Driver | None:
        handle = self.devices.get(device_id)
        return handle.driver if handle else None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for handle in self.devices.values():
                handle.task = tg.create_task(self._keep_running(handle))
                self.publish_state(handle)
            # Devices added later by replace() join this TaskGroup, so it must outlive the initial set.
            await asyncio.Event().wait()

    async def replace(self, configs: list[DeviceConfig]) -> dict[str, list[str]]:
        """Apply a new device list live (remote config): stop removed or changed devices, start new or changed
        ones; untouched devices keep running. Returns the device ids by what happened to them."""
        wanted = {c.id: c for c in configs if c.enabled}
        changed = [d for d, h in self.devices.items() if d in wanted and wanted[d] != h.config]
        removed = [d for d in self.devices if d not in wanted]
        added = [d for d in wanted if d not in self.devices]
        for dev in removed + changed:
            handle = self.devices.pop(dev)
            if handle.task is not None:
                handle.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handle.task
        for dev in changed + added:
            handle = self.devices[dev] = DeviceHandle(self, wanted[dev], self.store_id)
            if self._tg is not None:
                handle.task = self._tg.create_task(self._keep_running(handle))
            self.publish_state(handle)
        for dev in removed:
            self._publish(self._state_topic(dev), b"")  # clears the retained state of a device that is gone
        return {"added": added, "changed": changed, "removed": removed}

    def restart(self, device_id: str) -> None:
        """Restart one device's driver now (an operator's command). KeyError for an unknown device."""
        handle = self.devices[device_id]
        handle.restart_requested = True
        if handle.run_task is not None:
            handle.run_task.cancel()

    async def _keep_running(self, handle: DeviceHandle) -> None:
        cls = handle.driver_class
        attempt = 0
        while True:
            started = time.monotonic()
            handle.restart_requested = False
            try:
                handle.driver = cls(handle.config, handle)
                handle.run_task = asyncio.create_task(handle.driver.run(), name=f"driver-{handle.device_id}")
                await handle.run_task
                raise RuntimeError("driver stopped by itself")
            except asyncio.CancelledError:
                if not handle.restart_requested:
                    if handle.run_task is not None:
                        handle.run_task.cancel()
                    handle.set_health(Health.OFFLINE, None)
                    raise
                handle.restarts += 1
                handle.set_health(Health.OFFLINE, "restarted by operator")
                attempt = 0
                continue
            except OSError as err:
                # An expected fault (a printer that is off, a port unplugged, a share not mounted): the state
                # change is the one log line (set_health logs it); the same fault again on the next try is quiet.
                handle.restarts += 1
                handle.set_health(Health.OFFLINE, plain_error(err))
            except Exception as err:
                # A bug: its traceback once per distinct error (not once per restart), plain words for the page.
                handle.restarts += 1
                handle.set_health(Health.OFFLINE, INTERNAL_ERROR)
                crash = f"{type(err).__name__}: {err}"
                if crash != handle.last_crash:
                    handle.last_crash = crash
                    log.error("driver %s stopped on an internal error; restarting it", handle.device_id,
                              exc_info=True, extra={"device": handle.device_id})
            if time.monotonic() - started > 60:
                attempt = 0  # it ran a good while: the next failure starts the backoff afresh
            delay = backoff_delay(attempt, *self.backoff)
            handle.next_start = time.time() + delay
            try:
                await asyncio.sleep(delay)
            finally:
                handle.next_start = None
            attempt += 1
