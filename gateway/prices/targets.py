"""Finding the price targets (tills, label printers, ESL access points) among the running devices.

A device is a price target when its driver class declares a ``price_role``; the registry checked the class
against the PriceTarget protocol when it loaded it. The driver *instance* is looked up on every call because the
supervisor replaces it when it restarts a failed driver.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal, cast

from storelink.devices.supervisor import DeviceSupervisor
from storelink.drivers.base import Health, PriceTarget


@dataclass(frozen=True)
class TargetInfo:
    device: str
    role: Literal["till", "label"]
    online: bool


class Targets:
    def __init__(self, devices: DeviceSupervisor):
        self.devices = devices

    def all(self) -> list[TargetInfo]:
        out = []
        for dev_id, handle in sorted(self.devices.devices.items()):
            role = handle.driver_class.price_role
            if role is not None:
                online = handle.driver is not None and handle.state != Health.OFFLINE
                out.append(TargetInfo(dev_id, role, online))
        return out

    def driver(self, device: str) -> PriceTarget | None:
        """The live driver of `device` when it is a running price target and not offline, else None."""
        handle = self.devices.devices.get(device)
        if handle is None or handle.driver is None or handle.state == Health.OFFLINE:
            return None
        if handle.driver_class.price_role is None:
            return None
        return cast(PriceTarget, handle.driver)  # checked against PriceTarget when its class was loaded

    async def wait_driver(self, device: str, deadline: float) -> PriceTarget | None:
        """The live driver, waiting for it (a restarting driver, a till reconnecting) until `deadline`."""
        while True:
            drv = self.driver(device)
            if drv is not None or time.monotonic() >= deadline:
                return drv
            await asyncio.sleep(0.2)
