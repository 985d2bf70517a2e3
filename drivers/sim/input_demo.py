"""`storelink demo` part: a simulated serial scanner and a kiosk mat.

The scanner is a real pty: the story writes barcodes into its master side (a GTIN-13 with its AIM identifier, and
a garbled read) and the `serial_scanner` driver reads the slave side like a USB-serial scanner. The mat is a
gpiozero MockFactory pin that the story's customer steps on and off; the kiosk service purges the customer's cart
when they leave. `[cart] printer` points the kiosk's order slips at the demo's receipt printer (labels_demo).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from pathlib import Path
from typing import Any

from gpiozero import Device
from gpiozero.pins.mock import MockFactory

MAT_PIN = 17
SCANS: dict[str, bytes] = {
    "EAN-13": b"]E04006381333931\r",
    "garbled": b"]E0400\x00\xff\x9c\x13\x07noise\r",
    "GS1-128 with batch and expiry": b"]C1010400638133393110LOT42\x1d17271231\r",
}
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
         "leave_after_s": 1.0},
    ])
    cfg["cart"] = {"printer": "slips-1", "timeout": 5.0}


def scan(what: str) -> None:
    """The scanner reads one of SCANS (bytes as a real scanner sends them over its serial line)."""
    os.write(_state["master"], SCANS[what])


def step_on() -> None:
    Device.pin_factory.pin(MAT_PIN).drive_low()  # the mat's switch closes to ground


def step_off() -> None:
    Device.pin_factory.pin(MAT_PIN).drive_high()


async def run(_gateway: Any) -> None:
    try:
        await asyncio.Event().wait()  # the story drives the scanner and the mat
    finally:
        with contextlib.suppress(OSError, KeyError):
            os.close(_state.pop("master"))

