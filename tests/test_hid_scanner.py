"""Keyboard-wedge scanners through evdev.

This sandbox's kernel has no uinput (CONFIG_INPUT_UINPUT is not set, /dev/uinput cannot exist), so most tests
feed synthetic ``evdev.InputEvent`` objects through the driver's own reader: a stand-in device whose fd is a
real pipe, so ``loop.add_reader`` -> ``read()`` -> decoder -> outbox -> broker is the production path. The
``uinput`` test at the end drives a real virtual keyboard wherever /dev/uinput works (it is skipped here).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from evdev import InputEvent, ecodes

import storelink.drivers.hid_scanner as hid
from storelink.drivers.base import Health
from storelink.drivers.hid_scanner import Candidate, HidScannerConfig, KeyDecoder, select_device
from tests.helpers import Mosquitto, Subscriber
from tests.input_helpers import STORE, base_config, running_gateway, until

_REVERSE = {ch: (code, i == 1) for code, pair in HidScannerConfig.model_validate(
    {"id": "x", "driver": "hid_scanner", "path": "/x"}).key_table().items() for i, ch in enumerate(pair)}


def key(code: int, value: int) -> list[InputEvent]:
    """One key transition the way a real keyboard reports it: MSC_SCAN, EV_KEY, SYN_REPORT."""
    return [InputEvent(0, 0, ecodes.EV_MSC, ecodes.MSC_SCAN, 0x70000 + code),
            InputEvent(0, 0, ecodes.EV_KEY, code, value), InputEvent(0, 0, ecodes.EV_SYN, ecodes.SYN_REPORT, 0)]


def press(code: int) -> list[InputEvent]:
    return key(code, 1) + key(code, 0)


def typed(text: str, enter: bool = True) -> list[InputEvent]:
    """The key events a US-layout wedge scanner sends for ``text`` (GS as Ctrl+])."""
    out: list[InputEvent] = []
    for ch in text:
        if ch == "\x1d":
            out += key(ecodes.KEY_LEFTCTRL, 1) + press(ecodes.KEY_RIGHTBRACE) + key(ecodes.KEY_LEFTCTRL, 0)
            continue
        code, shifted = _REVERSE[ch] if ch not in "0123456789" else (getattr(ecodes, f"KEY_{ch}"), False)
        out += (key(ecodes.KEY_LEFTSHIFT, 1) + press(code) + key(ecodes.KEY_LEFTSHIFT, 0)) if shifted else press(code)
    return out + (press(ecodes.KEY_ENTER) if enter else [])


def decode(events: Iterable[InputEvent], cfg: dict[str, Any] | None = None, max_length: int = 64) -> list[Any]:
    table = HidScannerConfig.model_validate({"id": "x", "driver": "hid_scanner", "path": "/x", **(cfg or {})})
    d = KeyDecoder(table.key_table(), max_length)
    return [r.get("_text", r.get("reason")) for ev in events for r in d.feed(ev, 0.0)]


def test_decoder_shift_caps_ctrl_and_repeats() -> None:
    assert decode(typed("]C1Ab-9?")) == ["]C1Ab-9?"]
    assert decode(typed("0105901234123457\x1d10AB")) == ["0105901234123457\x1d10AB"]
    caps = press(ecodes.KEY_CAPSLOCK) + press(ecodes.KEY_A) + key(ecodes.KEY_LEFTSHIFT, 1) + press(ecodes.KEY_B) \
        + key(ecodes.KEY_LEFTSHIFT, 0) + press(ecodes.KEY_1) + press(ecodes.KEY_CAPSLOCK) + press(ecodes.KEY_C)
    assert decode(caps + press(ecodes.KEY_ENTER)) == ["Ab1c"]  # Caps Lock flips letters only
    repeat = key(ecodes.KEY_7, 1) + key(ecodes.KEY_7, 2) + key(ecodes.KEY_7, 2) + key(ecodes.KEY_7, 0)
    assert decode(repeat + press(ecodes.KEY_ENTER)) == ["7"]


def test_decoder_bad_input_and_keymap_overrides() -> None:
    assert decode(press(ecodes.KEY_F13) + typed("12")) == ["unmapped_key"]
    assert decode(typed("9" * 5000)) == ["overlong"]  # bounded: never holds more than max_length keys
    assert decode(press(ecodes.KEY_ENTER)) == []  # a lone Enter is not a scan
    qwertz = {"keymap_overrides": {"KEY_Z": ["y", "Y"], "KEY_Y": ["z", "Z"]}}
    assert decode(press(ecodes.KEY_Z) + press(ecodes.KEY_Y) + press(ecodes.KEY_ENTER), qwertz) == ["yz"]
    with pytest.raises(ValueError, match="not an evdev key name"):
        HidScannerConfig.model_validate({"id": "x", "driver": "hid_scanner", "path": "/x",
                                         "keymap_overrides": {"KEY_NOPE": ["a"]}})
    with pytest.raises(ValueError, match="exactly one of path, name or usb_id"):
        HidScannerConfig.model_validate({"id": "x", "driver": "hid_scanner", "path": "/x", "name": "y"})


def test_device_selection_by_name_or_usb_id() -> None:
    found = [Candidate("/dev/input/event0", "AT Translated Set 2 keyboard", 0x0001, 0x0001),
             Candidate("/dev/input/event5", "Honeywell Imaging & Mobility 1900", 0x0C2E, 0x0B61)]

    def cfg(**kw: str) -> HidScannerConfig:
        return HidScannerConfig.model_validate({"id": "s", "driver": "hid_scanner", **kw})

    assert select_device(cfg(name="Honeywell*"), found) == "/dev/input/event5"
    assert select_device(cfg(usb_id="0C2E:0B61"), found) == "/dev/input/event5"
    assert select_device(cfg(usb_id="05e0:1200"), found) is None


class SyntheticInputDevice:
    """Stands in for evdev.InputDevice: a real pipe fd for add_reader, synthetic InputEvents from read()."""

    def __init__(self, name: str = "Synthetic Wedge Scanner"):
        self.path, self.name = "/dev/input/event-synthetic", name
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._events: deque[InputEvent] = deque()
        self.grabbed = self.closed = self.gone = False

    def fileno(self) -> int:
        return self._r

    def push(self, events: Iterable[InputEvent]) -> None:
        self._events.extend(events)
        os.write(self._w, b".")

    def read(self) -> Iterator[InputEvent]:
        if self.gone:
            raise OSError(errno.ENODEV, "No such device")
        try:
            os.read(self._r, 4096)
        except BlockingIOError:
            pass
        if not self._events:
            raise BlockingIOError(errno.EAGAIN, "no events")
        batch = list(self._events)
        self._events.clear()
        return iter(batch)

    def grab(self) -> None:
        self.grabbed = True

    def close(self) -> None:
        self.closed = True
        self.grabbed = False
        os.close(self._r)
        os.close(self._w)

    def unplug(self) -> None:
        self.gone = True
        os.write(self._w, b".")


def scans(sub: Subscriber) -> list[dict[str, Any]]:
    return [e["data"] for e in sub.events(STORE) if e["kind"] == "scan"]


async def test_scans_through_the_driver_with_grab_and_replug(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugged: list[SyntheticInputDevice] = []
    opened: list[SyntheticInputDevice] = []

    def open_device(config: HidScannerConfig) -> SyntheticInputDevice:
        if not plugged:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", config.path)
        opened.append(plugged[-1])
        return plugged[-1]

    monkeypatch.setattr(hid, "open_input_device", open_device)
    plugged.append(SyntheticInputDevice())
    dev = {"id": "wedge1", "driver": "hid_scanner", "path": "/dev/input/by-id/usb-scanner-event-kbd"}
    async with running_gateway(base_config(tmp_path, mosquitto.port, [dev])) as gw:
        handle = gw.supervisor.devices["wedge1"]
        await until(lambda: handle.state == Health.OK, what="HID scanner online")
        first = opened[-1]
        assert first.grabbed  # EVIOCGRAB taken before any key is read
        first.push(typed("]E05901234123457"))
        first.push(typed("]C10105901234123457\x1d10LOT7"))
        first.push(typed("5901234123458"))  # bad check digit
        await until(lambda: len(scans(subscriber)) == 3, what="three scans")
        first.unplug()
        await until(lambda: handle.state == Health.OFFLINE and handle.restarts >= 1, what="offline when unplugged")
        assert first.closed and "input device" in (handle.last_error or "")
        plugged.clear()
        await asyncio.sleep(0.5)  # a few failed reopen attempts while it is away
        assert handle.state == Health.OFFLINE
        plugged.append(SyntheticInputDevice())
        await until(lambda: handle.state == Health.OK, 15, what="back online after replug")
        opened[-1].push(typed("96385074"))
        await until(lambda: len(scans(subscriber)) == 4, what="scan after replug")
    got = scans(subscriber)
    assert got[0]["gtin"] == "5901234123457" and got[0]["symbology"] == "EAN-13"
    assert got[1]["ai"] == {"01": "05901234123457", "10": "LOT7"}
    assert got[2]["valid"] is False and got[2]["reason"] == "bad_check_digit"
    assert got[3]["gtin"] == "96385074"


async def test_missing_device_is_offline_with_a_clear_error(tmp_path: Path, mosquitto: Mosquitto) -> None:
    # The real evdev lookup: nothing on this machine is called that, so the device stays offline and says why.
    dev = {"id": "wedge1", "driver": "hid_scanner", "name": "No Such Scanner*"}
    async with running_gateway(base_config(tmp_path, mosquitto.port, [dev])) as gw:
        handle = gw.supervisor.devices["wedge1"]
        await until(lambda: handle.restarts >= 2, what="two failed starts")
        assert handle.state == Health.OFFLINE
        assert "no input device matches name='No Such Scanner*'" in (handle.last_error or "")


def _uinput_works() -> bool:
    try:
        from evdev import UInput

        UInput(name="storelink-probe").close()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _uinput_works(), reason="/dev/uinput is not available (kernel without CONFIG_INPUT_UINPUT)")
async def test_real_virtual_keyboard_via_uinput(tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    from evdev import UInput

    keys = sorted({ev.code for ev in typed("]E05901234123457") if ev.type == ecodes.EV_KEY})
    with UInput({ecodes.EV_KEY: keys}, name="StoreLink Test Wedge", vendor=0x05E0, product=0x1200) as ui:
        dev = {"id": "wedge1", "driver": "hid_scanner", "usb_id": "05e0:1200"}
        async with running_gateway(base_config(tmp_path, mosquitto.port, [dev])) as gw:
            await until(lambda: gw.supervisor.devices["wedge1"].state == Health.OK, 15, what="uinput device found")
            for ev in typed("]E05901234123457"):
                if ev.type == ecodes.EV_KEY:
                    ui.write(ecodes.EV_KEY, ev.code, ev.value)
                    ui.syn()
            await until(lambda: scans(subscriber), what="scan from the virtual keyboard")
    assert scans(subscriber)[0]["gtin"] == "5901234123457"
