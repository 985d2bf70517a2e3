"""Finding the price targets (tills, label printers, ESL access points) among the running devices.

A device is a price target when its driver class has a ``price_role``; the driver *instance* is looked up on
every call because the supervisor replaces it when it restarts a failed driver. Tests and the bench can add
in-process targets through ``Targets.extra``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storelink.drivers.base import Health

if TYPE_CHECKING:
    from storelink.app import Gateway


@dataclass(frozen=True)
class TargetInfo:
    device: str
    role: str  # "till" | "label"
    online: bool


class Targets:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.extra: dict[str, Any] = {}

    def _roles(self) -> dict[str, str]:
        from storelink.devices.registry import load_driver

        out: dict[str, str] = {}
        for dev_id, handle in self.gateway.supervisor.devices.items():
            role = getattr(load_driver(handle.config.driver), "price_role", None)
            if isinstance(role, str):
                out[dev_id] = role
        for dev_id, target in self.extra.items():
            out[dev_id] = str(target.price_role)
        return out

    def all(self) -> list[TargetInfo]:
        out = []
        for dev_id, role in sorted(self._roles().items()):
            if dev_id in self.extra:
                online = bool(getattr(self.extra[dev_id], "online", True))
            else:
                handle = self.gateway.supervisor.devices[dev_id]
                online = handle.driver is not None and handle.state != Health.OFFLINE
            out.append(TargetInfo(dev_id, role, online))
        return out

    def driver(self, device: str) -> Any | None:
        """The live driver of `device` when it is running and not offline, else None."""
        if device in self.extra:
            target = self.extra[device]
            return target if getattr(target, "online", True) else None
        handle = self.gateway.supervisor.devices.get(device)
        if handle is None or handle.driver is None or handle.state == Health.OFFLINE:
            return None
        return handle.driver

    def instance(self, device: str) -> Any | None:
        """The running driver of `device` whatever its health: a label driver keeps an abort or a commit in its
        own database and delivers it when its device answers again."""
        if device in self.extra:
            return self.extra[device]
        handle = self.gateway.supervisor.devices.get(device)
        return None if handle is None else handle.driver

    def configured(self, device: str) -> bool:
        """Still in the config (a device removed while it had something to deliver is given up)."""
        return device in self.extra or device in self.gateway.supervisor.devices

    async def wait_driver(self, device: str, deadline: float) -> Any | None:
        """The live driver, waiting for it (a restarting driver, a till reconnecting) until `deadline`."""
        while True:
            drv = self.driver(device)
            if drv is not None or time.monotonic() >= deadline:
                return drv
            await asyncio.sleep(0.2)
