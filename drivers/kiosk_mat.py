"""A pressure mat in front of a kiosk, on a GPIO pin (gpiozero): stepping on starts a customer session, stepping
off for ``leave_after_s`` ends it, and the kiosk service (gateway/kiosk/sessions.py) then purges that customer's data.

Debouncing is ours (``MatLogic``, a pure state machine fed with edges and a clock): a mat's contacts bounce for
tens of milliseconds, gpiozero's own ``bounce_time`` drops edges rather than settling on the final level, and its
MockFactory cannot simulate bounce at all, so a testable debouncer has to take the time as an argument.
gpiozero calls back from its own threads; the callbacks only stamp the edge with the clock and hand it to the
event loop with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from storelink.drivers.base import DeviceConfig, DeviceContext, Driver, Health, KioskView, Requirement
from storelink.validation import Identifier

if TYPE_CHECKING:
    from gpiozero import DigitalInputDevice

log = logging.getLogger(__name__)

Action = tuple[Literal["start", "end"], str]


class KioskMatConfig(DeviceConfig):
    driver: Literal["kiosk_mat"] = "kiosk_mat"
    pin: int | str = Field(description='GPIO pin as gpiozero names it: 17, "GPIO17", "BOARD11"')
    pull_up: bool = Field(True, description="mat switch wired to ground (internal pull-up); false: to 3.3 V")
    normally_closed: bool = Field(False, description="the mat opens its contact when stepped on")
    kiosk_id: Identifier | None = Field(None, description="the kiosk this mat guards (default: id)")
    debounce_s: float = Field(0.05, ge=0, le=5, description="a level must hold this long to count")
    leave_after_s: float = Field(5.0, gt=0, le=3600, description="off the mat this long ends the session")
    max_session_s: float = Field(1800, ge=0, description="end a session this old even if the mat stays pressed "
                                                         "(something left on it); 0: no limit")

    @model_validator(mode="after")
    def _leave_after_debounce(self) -> KioskMatConfig:
        if self.leave_after_s < self.debounce_s:
            raise ValueError("leave_after_s must be at least debounce_s")
        return self

    @property
    def kiosk(self) -> str:
        return self.kiosk_id or self.id


class MatLogic:
    """Debounced occupancy of a mat. ``edge()`` records raw levels with their time, ``poll(now)`` says what
    happened, ``next_deadline()`` when to poll next. No I/O and no sleeping: tests drive it with a fake clock."""

    def __init__(self, debounce_s: float, leave_after_s: float, max_session_s: float = 0, occupied: bool = False,
                 now: float = 0.0):
        self.debounce_s = debounce_s
        self.leave_after_s = leave_after_s
        self.max_session_s = max_session_s
        self.raw: bool | None = None
        self.raw_since = now
        self.occupied = occupied
        self.session_since = now
        self._await_release = False  # after a max-duration end, a new session needs a step off and on again

    def edge(self, pressed: bool, at: float) -> None:
        if pressed != self.raw:
            self.raw, self.raw_since = pressed, at
            if not pressed:
                self._await_release = False

    def next_deadline(self) -> float | None:
        if self.raw is None:
            return None
        if self.raw and not self.occupied and not self._await_release:
            return self.raw_since + self.debounce_s
        if self.occupied and not self.raw:
            return self.raw_since + self.leave_after_s
        if self.occupied and self.max_session_s:
            return self.session_since + self.max_session_s
        return None

    def poll(self, now: float) -> list[Action]:
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        if not self.occupied:
            self.occupied, self.session_since = True, now
            return [("start", "stepped_on")]
        self.occupied = False
        if self.raw:
            self._await_release = True
            return [("end", "max_duration")]
        return [("end", "stepped_off")]


class KioskMat(Driver):
    config_model: ClassVar[type[DeviceConfig]] = KioskMatConfig
    requires: ClassVar[tuple[Requirement, ...]] = (Requirement("gpiozero", "gpio"),)
    uses_kiosk_sessions = True
    config: KioskMatConfig
    clock: ClassVar[Callable[[], float]] = time.monotonic

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        assert isinstance(config, KioskMatConfig)
        super().__init__(config, ctx)
        self.logic: MatLogic | None = None

    def _open(self) -> DigitalInputDevice:
        # lazily: gpiozero is ~9 MB, and most gateways have no mat
        from gpiozero import DigitalInputDevice, GPIOZeroError, PinFactoryFallback

        try:
            with warnings.catch_warnings():  # one PinFactoryFallback warning per library tried: noise in the log
                warnings.simplefilter("ignore", PinFactoryFallback)
                return DigitalInputDevice(self.config.pin, pull_up=self.config.pull_up, bounce_time=None)
        except GPIOZeroError as err:  # no GPIO on this machine, a pin in use: a device fault, not a bug
            raise OSError(f"GPIO pin {self.config.pin} cannot be used: {err}") from err

    async def run(self) -> None:
        kiosk = self.ctx.kiosk
        if kiosk is None:  # the gateway starts kiosk sessions when a device needs them: a restart is due
            raise RuntimeError("this gateway runs no kiosk sessions (restart it to start them for this device)")
        kiosk_id = self.config.kiosk
        loop = asyncio.get_running_loop()
        edges: asyncio.Queue[tuple[bool, float]] = asyncio.Queue()
        clock = type(self).clock
        nc = self.config.normally_closed

        def on_edge(active: bool) -> None:  # a gpiozero thread (or the caller's, with MockFactory)
            loop.call_soon_threadsafe(edges.put_nowait, (active != nc, clock()))

        device = await asyncio.to_thread(self._open)
        try:
            device.when_activated = lambda: on_edge(True)
            device.when_deactivated = lambda: on_edge(False)
            # A restart mid-session (driver crash) continues the session the service still has open.
            self.logic = logic = MatLogic(self.config.debounce_s, self.config.leave_after_s,
                                          self.config.max_session_s, occupied=kiosk.active(kiosk_id), now=clock())
            logic.edge(bool(device.is_active) != nc, clock())
            self.ctx.set_health(Health.OK)
            log.info("kiosk mat %s on pin %s guards kiosk %s", self.config.id, self.config.pin, kiosk_id,
                     extra={"device": self.config.id})
            while True:
                deadline = logic.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        pressed, at = await edges.get()
                    logic.edge(pressed, at)
                    while not edges.empty():
                        logic.edge(*edges.get_nowait())
                    self.ctx.seen()
                for action, reason in logic.poll(clock()):
                    await self._act(kiosk, kiosk_id, action, reason)
        finally:
            device.when_activated = device.when_deactivated = None
            await asyncio.to_thread(device.close)

    async def _act(self, kiosk: KioskView, kiosk_id: str, action: str, reason: str) -> None:
        if action == "start":
            await kiosk.session_started(kiosk_id)
        else:
            await kiosk.session_ended(kiosk_id, reason=reason)
