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
from storelink.drivers.base import Health, HoldingTillTarget, LabelPriceTarget, PriceTarget, TillPriceTarget


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

    def till(self, device: str) -> TillPriceTarget | None:
        """The live driver of `device` when it is a running till and not offline, else None."""
        drv = self.driver(device)
        handle = self.devices.devices.get(device)
        if drv is None or handle is None or handle.driver_class.price_role != "till":
            return None
        return cast(TillPriceTarget, drv)  # checked against TillPriceTarget when its class was loaded

    def holding(self, device: str) -> HoldingTillTarget | None:
        """The live till `device` when it keeps holds now (HOLD/FINAL), else None."""
        till = self.till(device)
        return till if isinstance(till, HoldingTillTarget) and till.price_can_hold else None

    def instance(self, device: str) -> LabelPriceTarget | None:
        """The running label driver of `device` whatever its health: a label driver keeps an abort or a commit in
        its own database and delivers it when its device answers again."""
        handle = self.devices.devices.get(device)
        if handle is None or handle.driver is None or handle.driver_class.price_role != "label":
            return None
        return cast(LabelPriceTarget, handle.driver)  # checked against LabelPriceTarget when its class was loaded

    def configured(self, device: str) -> bool:
        """Still in the config (a device removed while it had something to deliver is given up)."""
        return device in self.devices.devices

    async def wait_driver(self, device: str, deadline: float) -> PriceTarget | None:
        """The live driver, waiting for it (a restarting driver, a till reconnecting) until `deadline`."""
        while True:
            drv = self.driver(device)
            if drv is not None or time.monotonic() >= deadline:
                return drv
            await asyncio.sleep(0.2)
