"""Shared parts for the till and price-file tests: an in-process gateway on a real broker, price changes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storelink.app import Gateway, PartsFactory, standard_parts
from storelink.config import parse_config
from tests.helpers import free_port

STORE = "store-0042"


@dataclass(frozen=True)
class Item:
    sku: str
    price: int
    description: str = "Item"
    gtin: str | None = None
    unit_price: int | None = None
    unit_basis: str | None = None


@dataclass(frozen=True)
class Change:
    version: int
    changed: list[Item] = field(default_factory=list)
    batch_id: str = "b-1"
    currency: str = "EUR"
    transition_prices: dict[str, int] = field(default_factory=dict)
    effective_at: float | None = None


class FakeBook:
    """A price book for driver tests (storelink.drivers.base.PriceBookView); tests override what they need."""

    active_version = 0

    def is_stale(self, _device: str) -> bool:
        return False

    def version_for(self, _device: str) -> int:
        return self.active_version

    async def alookup(self, _code: str) -> dict[str, Any] | None:
        return None

    def iter_items(self) -> list[Item]:
        return []


def gateway_config(tmp_path: Path, broker_port: int, devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "store_id": STORE,
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "reconnect_min": 0.2, "reconnect_max": 1.0},
        "storage": {"path": str(tmp_path / "gw.db"), "synchronous": "NORMAL"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "devices": devices,
    }


@contextlib.asynccontextmanager
async def running(cfg: dict[str, Any], parts: PartsFactory = standard_parts) -> AsyncIterator[Gateway]:
    gw = Gateway(parse_config(cfg, "<test>"), parts=parts)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await until(lambda: gw.ready.is_set() or task.done(), what="the gateway to start")
    assert not task.done(), task.exception()
    try:
        yield gw
    finally:
        stop.set()
        await task


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        await asyncio.sleep(0.02)


def device_status(gw: Gateway, device_id: str) -> dict[str, Any]:
    return next(d for d in gw.status()["devices"] if d["device"] == device_id)
