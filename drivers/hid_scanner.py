"""Keyboard-wedge (USB HID) barcode scanners read straight from the Linux input layer with evdev.

No X server and no focused window: the device is opened under /dev/input and grabbed (EVIOCGRAB), so its
keystrokes reach only us - a scan cannot type into the kiosk screen or a shell. Key events are turned back into
text with a keymap (US layout built in; ``keymap_overrides`` for other layouts) honouring Shift, Caps Lock and
Ctrl (scanners in "ASCII control" mode send the GS1 separator as Ctrl+]); Enter ends a scan.

The device is read with ``loop.add_reader`` on its non-blocking fd: ``read()`` returns at once with the events
the kernel holds, so nothing blocks the loop. A vanished device (ENODEV) ends ``run()``; the supervisor reopens
it with backoff, matching by path, by name or by USB vendor:product.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import Field, field_validator, model_validator

from storelink.drivers.barcodes import BarcodeConfig, ScanReporter, interpret, invalid, warm_up
from storelink.drivers.base import DeviceConfig, DeviceContext, Driver, Health, Requirement

# evdev is imported when a HID scanner runs: this module must import without the [hid] extra, so that validating a
# config can name the missing extra instead of failing on the import.
if TYPE_CHECKING:
    from evdev import InputEvent

log = logging.getLogger(__name__)

_US_PAIRS = {
    "KEY_1": "1!", "KEY_2": "2@", "KEY_3": "3#", "KEY_4": "4$", "KEY_5": "5%", "KEY_6": "6^", "KEY_7": "7&",
    "KEY_8": "8*", "KEY_9": "9(", "KEY_0": "0)", "KEY_MINUS": "-_", "KEY_EQUAL": "=+", "KEY_LEFTBRACE": "[{",
    "KEY_RIGHTBRACE": "]}", "KEY_BACKSLASH": "\\|", "KEY_SEMICOLON": ";:", "KEY_APOSTROPHE": "'\"",
    "KEY_GRAVE": "`~", "KEY_COMMA": ",<", "KEY_DOT": ".>", "KEY_SLASH": "/?", "KEY_SPACE": "  ",
    "KEY_TAB": "\t\t", "KEY_KP0": "00", "KEY_KP1": "11", "KEY_KP2": "22", "KEY_KP3": "33", "KEY_KP4": "44",
    "KEY_KP5": "55", "KEY_KP6": "66", "KEY_KP7": "77", "KEY_KP8": "88", "KEY_KP9": "99", "KEY_KPMINUS": "--",
    "KEY_KPPLUS": "++", "KEY_KPDOT": "..", "KEY_KPSLASH": "//", "KEY_KPASTERISK": "**",
} | {f"KEY_{c}": c.lower() + c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
KEYMAPS: dict[str, dict[str, tuple[str, str]]] = {"us": {k: (v[0], v[1]) for k, v in _US_PAIRS.items()}}

KEY_DOWN, KEY_UP = 1, 0  # value 2 is autorepeat: a scanner never holds a key, so repeats are ignored


def key_code(name: str) -> int | None:
    """The evdev code of a key name (``KEY_A``), or None."""
    from evdev import ecodes

    code = getattr(ecodes, name, None) if name.startswith("KEY_") else None
    return code if isinstance(code, int) else None


@dataclass(frozen=True)
class _Keys:
    ev_key: int
    shift: frozenset[int]
    ctrl: frozenset[int]
    ignored: frozenset[int]
    enter: frozenset[int]
    capslock: int


@functools.cache
def _keys() -> _Keys:
    from evdev import ecodes as e

    return _Keys(e.EV_KEY, frozenset({e.KEY_LEFTSHIFT, e.KEY_RIGHTSHIFT}), frozenset({e.KEY_LEFTCTRL, e.KEY_RIGHTCTRL}),
                 frozenset({e.KEY_LEFTALT, e.KEY_RIGHTALT, e.KEY_LEFTMETA, e.KEY_RIGHTMETA, e.KEY_NUMLOCK}),
                 frozenset({e.KEY_ENTER, e.KEY_KPENTER}), e.KEY_CAPSLOCK)


class HidScannerConfig(DeviceConfig, BarcodeConfig):
    driver: Literal["hid_scanner"] = "hid_scanner"
    path: str | None = Field(None, description="/dev/input/by-id/... or /dev/input/eventN")
    name: str | None = Field(None, description="device name as the kernel reports it (shell wildcards allowed)")
    usb_id: str | None = Field(None, pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$", description="vendor:product")
    grab: bool = Field(True, description="take the device exclusively so scans never type into other programs")
    keymap: Literal["us"] = "us"
    keymap_overrides: dict[str, list[str]] = Field(
        default_factory=dict, description='e.g. { KEY_Z = ["y", "Y"], KEY_Y = ["z", "Z"] } for QWERTZ'
    )
    frame_timeout: float = Field(2.0, ge=0, description="seconds before a scan without Enter is `unterminated`")

    @model_validator(mode="after")
    def _one_selector(self) -> HidScannerConfig:
        if sum(x is not None for x in (self.path, self.name, self.usb_id)) != 1:
            raise ValueError("give exactly one of path, name or usb_id to choose the input device")
        return self

    @field_validator("keymap_overrides")
    @classmethod
    def _known_keys(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, chars in v.items():
            if key_code(key) is None:
                raise ValueError(f"{key!r} is not an evdev key name (KEY_...)")
            if not 1 <= len(chars) <= 2 or not all(len(c) == 1 for c in chars):
                raise ValueError(f"{key}: give [unshifted] or [unshifted, shifted], one character each")
        return v

    def key_table(self) -> dict[int, tuple[str, str]]:
        table = {key_code(k): v for k, v in KEYMAPS[self.keymap].items()}
        for key, chars in self.keymap_overrides.items():
            table[key_code(key)] = (chars[0], chars[-1])
        return {code: chars for code, chars in table.items() if code is not None}


class KeyDecoder:
    """Key events -> scanned text. Bounded like the serial framer: past ``max_length`` the scan is dropped."""

    def __init__(self, table: dict[int, tuple[str, str]], max_length: int):
        self.table = table
        self.max_length = max_length
        self._chars: list[str] = []
        self._shift: set[int] = set()
        self._ctrl: set[int] = set()
        self._caps = False
        self._unmapped = 0
        self._overlong = 0  # characters seen in an overlong scan, reported once at Enter
        self.partial_since: float | None = None
        self.keys = _keys()

    def feed(self, event: InputEvent, now: float) -> list[dict[str, Any]]:
        """The finished scans (as scan event data) this event completes."""
        k = self.keys
        if event.type != k.ev_key:
            return []
        code, value = event.code, event.value
        if code in k.shift or code in k.ctrl:
            held = self._shift if code in k.shift else self._ctrl
            (held.add if value else held.discard)(code)
            return []
        if value != KEY_DOWN or code in k.ignored:
            return []
        if code == k.capslock:
            self._caps = not self._caps
            return []
        if code in k.enter:
            return self._finish()
        self.partial_since = self.partial_since or now
        chars = self.table.get(code)
        if chars is None:
            self._unmapped += 1
            ch = ""
        else:
            ch = chars[1] if bool(self._shift) != (self._caps and chars[0].isalpha()) else chars[0]
            if self._ctrl and ch.upper() in "@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_":
                ch = chr(ord(ch.upper()) & 0x1F)  # Ctrl+] is GS (0x1D), the GS1 field separator
        if self._overlong:
            self._overlong += 1
        elif len(self._chars) >= self.max_length:
            self._overlong = len(self._chars) + 1
            self._chars.clear()
        elif ch:
            self._chars.append(ch)
        return []

    def _finish(self) -> list[dict[str, Any]]:
        text, unmapped, overlong = "".join(self._chars), self._unmapped, self._overlong
        self._chars.clear()
        self._unmapped = self._overlong = 0
        self.partial_since = None
        if overlong:
            return [invalid("overlong", f"no Enter within {self.max_length} keys", overlong)]
        if unmapped:
            return [invalid("unmapped_key", f"{unmapped} keys not in the keymap (wrong keymap?)",
                            len(text) + unmapped)]
        return [] if not text else [{"_text": text}]

    def flush_partial(self) -> list[dict[str, Any]]:
        """A scan that never got its Enter."""
        if self._overlong:
            return self._finish()
        length = len(self._chars) + self._unmapped
        self._chars.clear()
        self._unmapped = 0
        self.partial_since = None
        return [invalid("unterminated", "no Enter after the scan", length)] if length else []


class InputSource(Protocol):
    """What the driver needs from an input device (evdev.InputDevice has all of it)."""

    path: str | bytes
    name: str

    def fileno(self) -> int: ...
    def read(self) -> Iterable[InputEvent]: ...
    def grab(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Candidate:
    path: str
    name: str
    vendor: int
    product: int


def select_device(config: HidScannerConfig, candidates: Iterable[Candidate]) -> str | None:
    """The path of the first candidate matching the config's name or usb_id."""
    for c in candidates:
        if config.name is not None and fnmatch.fnmatchcase(c.name, config.name):
            return c.path
        if config.usb_id is not None and f"{c.vendor:04x}:{c.product:04x}" == config.usb_id.lower():
            return c.path
    return None


def _candidates() -> list[Candidate]:
    from evdev import InputDevice, list_devices

    found = []
    for path in list_devices():
        with contextlib.suppress(OSError):
            dev = InputDevice(path)
            found.append(Candidate(path, dev.name, dev.info.vendor, dev.info.product))
            dev.close()
    return found


def open_input_device(config: HidScannerConfig) -> InputSource:
    """Open (and grab) the configured device. Blocking; raises OSError when it is not there."""
    path = config.path
    if path is None:
        candidates = _candidates()
        path = select_device(config, candidates)
        if path is None:
            wanted = f"name={config.name!r}" if config.name else f"usb_id={config.usb_id}"
            seen = ", ".join(f"{c.name!r} ({c.vendor:04x}:{c.product:04x})" for c in candidates) or "none"
            raise FileNotFoundError(f"no input device matches {wanted} (found: {seen})")
    from evdev import InputDevice

    return InputDevice(path)


class HidScanner(Driver):
    config_model: ClassVar[type[DeviceConfig]] = HidScannerConfig
    requires: ClassVar[tuple[Requirement, ...]] = (Requirement("evdev", "hid"),)
    config: HidScannerConfig

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        assert isinstance(config, HidScannerConfig)
        super().__init__(config, ctx)
        self.reporter = ScanReporter(ctx, log)

    async def run(self) -> None:
        await asyncio.to_thread(warm_up)
        device = await asyncio.to_thread(open_input_device, self.config)
        loop = asyncio.get_running_loop()
        batches: asyncio.Queue[list[InputEvent] | BaseException] = asyncio.Queue()

        def readable() -> None:
            try:
                batches.put_nowait(list(device.read()))
            except BlockingIOError:
                pass
            except OSError as err:  # ENODEV: unplugged
                loop.remove_reader(device.fileno())
                batches.put_nowait(err)

        try:
            if self.config.grab:
                device.grab()  # EVIOCGRAB: from now on only this fd gets the scanner's keys
            loop.add_reader(device.fileno(), readable)
            self.ctx.set_health(Health.OK)
            log.info("HID scanner %s reading %s (%s)%s", self.config.id, device.path, device.name,
                     ", grabbed" if self.config.grab else "", extra={"device": self.config.id})
            await self._consume(batches)
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(device.fileno())
            with contextlib.suppress(Exception):
                device.close()  # closing the fd also releases the grab

    async def _consume(self, batches: asyncio.Queue[list[InputEvent] | BaseException]) -> None:
        decoder = KeyDecoder(self.config.key_table(), self.config.max_length)
        timeout = self.config.frame_timeout
        while True:
            wait = None
            if timeout and decoder.partial_since is not None:
                wait = max(0.0, decoder.partial_since + timeout - time.monotonic())
            try:
                async with asyncio.timeout(wait):
                    batch = await batches.get()
            except TimeoutError:
                await self.reporter.report(decoder.flush_partial())
                continue
            if isinstance(batch, BaseException):
                raise ConnectionError(f"input device {self.config.path or self.config.name or self.config.usb_id}:"
                                      f" {batch}") from batch
            now = time.monotonic()
            results = [r for ev in batch for r in decoder.feed(ev, now)]
            await self.reporter.report([interpret(r.pop("_text"), self.config) if "_text" in r else r
                                        for r in results])
