"""`storelink demo` part: a simulated serial scanner and a kiosk mat.

The scanner is a real pty: the demo writes barcodes into its master side (a GTIN-13 with its AIM identifier, a
GS1-128 with batch and expiry, an in-store price label, and now and then a garbled read) and the
`serial_scanner` driver reads the slave side like a USB-serial scanner. The mat is a gpiozero MockFactory pin
that a simulated customer steps on and off; the kiosk service purges the customer's cart when they leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tty
from pathlib import Path
from typing import Any

from gpiozero import Device
from gpiozero.pins.mock import MockFactory

MAT_PIN = 17
SCANS: list[tuple[str, bytes]] = [
    ("EAN-13", b"]E04006381333931\r"),
    ("garbled read", b"]E0400\x00\xff\x9c\x13\x07noise\r"),
    ("GS1-128 with batch and expiry", b"]C1010400638133393110LOT42\x1d17271231\r"),
    ("in-store price label (GB layout)", b"2012345702509\r"),
    ("EAN-8", b"]E496385074\r"),
]
_state: dict[str, Any] = {}


def prepare(cfg: dict[str, Any], workdir: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    link = workdir / "scanner-1"
    link.symlink_to(os.ttyname(slave))
    os.close(slave)
    _state["master"] = master
    Device.pin_factory = MockFactory()  # no GPIO header on a laptop: a simulated pin the demo drives
    cfg.setdefault("devices", []).extend([
        {"id": "scanner-1", "driver": "serial_scanner", "port": str(link), "baudrate": 115200,
         "terminator": "CR", "rcn_region": "gb"},
        {"id": "mat-1", "driver": "kiosk_mat", "pin": MAT_PIN, "kiosk_id": "kiosk-1", "debounce_s": 0.05,
         "leave_after_s": 1.5},
    ])


async def _wait_ok(gateway: Any, device: str) -> None:
    for _ in range(100):
        if gateway.supervisor.devices[device].state == "ok":
            return
        await asyncio.sleep(0.05)


async def _scanner(gateway: Any) -> None:
    master = _state["master"]
    await _wait_ok(gateway, "scanner-1")
    for what, data in itertools.cycle(SCANS):
        print(f"[scanner-1] scans {what}", flush=True)
        os.write(master, data)
        await asyncio.sleep(1.5)


async def _customer(gateway: Any) -> None:
    kiosk = gateway.kiosk
    pin = Device.pin_factory.pin(MAT_PIN)
    await _wait_ok(gateway, "mat-1")
    while True:
        await asyncio.sleep(0.5)
        print("[kiosk-1] a customer steps on the mat", flush=True)
        pin.drive_low()
        for _ in range(40):
            if kiosk.active("kiosk-1"):
                break
            await asyncio.sleep(0.05)
        kiosk.store("kiosk-1", "cart", ["4006381333931", "96385074"])
        await kiosk.persist("kiosk-1", "loyalty_card", "DEMO-CARD-0001")
        print("[kiosk-1] cart and loyalty card held for the session", flush=True)
        await asyncio.sleep(2.0)
        print("[kiosk-1] the customer steps off", flush=True)
        pin.drive_high()
        while "kiosk-1" in kiosk.status()["sessions"]:  # until the purge is complete
            await asyncio.sleep(0.05)
        left = kiosk.get("kiosk-1", "cart"), await kiosk.load("kiosk-1", "loyalty_card")
        print(f"[kiosk-1] session over; customer data left: cart={left[0]} loyalty_card={left[1]}", flush=True)
        await asyncio.sleep(8.0)


async def run(gateway: Any) -> None:
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_scanner(gateway))
            tg.create_task(_customer(gateway))
    finally:
        with contextlib.suppress(OSError):
            os.close(_state.pop("master"))

