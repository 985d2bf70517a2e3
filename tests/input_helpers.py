"""Helpers for the input-device tests (scanners, kiosk mat): an in-process gateway and a pty "scanner"."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import tty
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from storelink.app import Gateway
from storelink.config import parse_config

STORE = "store-0042"


def base_config(tmp_path: Path, broker_port: int, devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "store_id": STORE,
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "reconnect_min": 0.2, "reconnect_max": 1.0},
        "storage": {"path": str(tmp_path / "storelink.db"), "synchronous": "NORMAL"},
        "http": {"listen": "127.0.0.1:0"},
        "devices": devices,
    }


@contextlib.asynccontextmanager
async def running_gateway(cfg: dict[str, Any], backoff: tuple[float, float] = (0.1, 0.5)) -> AsyncIterator[Gateway]:
    """A real Gateway (outbox, uplink, supervisor, parts) running in this event loop."""
    gw = Gateway(parse_config(cfg, "<test>"))
    gw.supervisor.backoff = backoff  # restart fast: the tests unplug devices on purpose
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    try:
        await asyncio.wait_for(gw.ready.wait(), 20)
        yield gw
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """wait_for for async tests: polls without blocking the loop the gateway runs in."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


class PtyScanner:
    """A simulated serial scanner: the master side of a real pty; the driver opens ``link`` (like a udev
    /dev/serial/by-id link). ``unplug()`` closes the master (the driver's reads fail like a pulled USB cable);
    ``plug()`` makes a new pty and points the link at it."""

    def __init__(self, link: Path):
        self.link = link
        self.master: int | None = None
        self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(master)
        name = os.ttyname(slave)
        os.close(slave)  # the driver opens it by path; the master keeps the pty alive
        tmp = self.link.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(name)
        tmp.replace(self.link)
        self.master = master

    def unplug(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None

    def write(self, data: bytes) -> None:
        assert self.master is not None
        view = memoryview(data)
        while view:
            n = os.write(self.master, view)
            view = view[n:]
