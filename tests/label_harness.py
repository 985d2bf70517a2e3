"""Test plumbing for the label drivers: a device context that records what the driver reports, and plain price
items/changes shaped like the price coordinator's (drivers/base.py protocols)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storelink.drivers.base import Health


@dataclasses.dataclass(frozen=True)
class Item:
    sku: str
    gtin: str | None
    price: int
    description: str
    unit_price: int | None = None
    unit_basis: str | None = None


@dataclasses.dataclass(frozen=True)
class Change:
    version: int
    changed: list[Any]
    currency: str = "EUR"
    batch_id: str = "b-test"
    transition_prices: dict[str, int] = dataclasses.field(default_factory=dict)
    effective_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Ref:
    id: str
    seq: int


class RecordingContext:
    """The DeviceContext the supervisor would give, recording emits and health changes."""

    def __init__(self, storage_dir: Path, device_id: str = "dev-1", synchronous: str = "NORMAL"):
        self.store_id = "store-test"
        self.device_id = device_id
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.health: list[tuple[Health, str | None]] = []
        self.last_seen: float | None = None
        self.data_dir = storage_dir
        self.storage_sync = synchronous
        self.prices = None
        self.kiosk = None

    async def emit(self, kind: str, data: dict[str, Any]) -> Ref:
        self.events.append((kind, data))
        return Ref(str(len(self.events)), len(self.events))

    def set_health(self, state: Health, error: str | None = None) -> None:
        if not self.health or self.health[-1] != (state, error):
            self.health.append((state, error))

    def seen(self) -> None:
        self.last_seen = time.time()

    def watch_thread(self, name: str, max_silence: float) -> Callable[[], None]:
        return lambda: None

    def unwatch_thread(self, name: str) -> None:
        pass

    @property
    def state(self) -> Health | None:
        return self.health[-1][0] if self.health else None

    @property
    def error(self) -> str | None:
        return self.health[-1][1] if self.health else None


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Async wait_for: polls `predicate` (sync) until truthy; generous default for a busy machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


async def until_async(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
