"""Serial scanner on real ptys: good scans reach head office interpreted, bad ones are reported as bad (never
crash the driver, never log the noise), and an unplugged port is offline until it is back."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from biip.checksums import gs1_price_weight_check_digit, gs1_standard_check_digit

from storelink.drivers.barcodes import BarcodeConfig, RcnLayout, interpret
from storelink.drivers.base import Health
from storelink.drivers.serial_scanner import Framer, Overlong, SerialScannerConfig, decode_frame
from tests.helpers import Mosquitto, Subscriber
from tests.input_helpers import STORE, PtyScanner, base_config, running_gateway, until


def with_check_digit(payload: str) -> str:
    return payload + str(gs1_standard_check_digit(payload))


def price_code(item: str, cents: int) -> str:
    """A GB-style in-store price code: 20, 5-digit item, price check digit, 4-digit price, GTIN check digit."""
    value = f"{cents:04d}"
    return with_check_digit(f"20{item}{gs1_price_weight_check_digit(value)}{value}")


# -- interpretation (biip) -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("]E05901234123457", {"valid": True, "type": "gtin", "gtin_format": "GTIN-13", "symbology": "EAN-13"}),
        ("96385074", {"valid": True, "type": "gtin", "gtin_format": "GTIN-8"}),
        ("036000291452", {"valid": True, "type": "gtin", "gtin_format": "GTIN-12"}),
        ("]I110614141000415", {"valid": True, "type": "gtin", "gtin_format": "GTIN-14", "symbology": "ITF-14"}),
        ("5901234123458", {"valid": False, "reason": "bad_check_digit"}),
        ("]E05901234123458", {"valid": False, "reason": "bad_check_digit", "aim": "]E0"}),
        ("]C1010590123412345710ABC123\x1d17250101",
         {"valid": True, "type": "gs1", "ai": {"01": "05901234123457", "10": "ABC123", "17": "250101"}}),
        ("]C10105901234123458", {"valid": False, "reason": "bad_check_digit"}),
        ("]C1zzz", {"valid": False, "reason": "invalid_gs1"}),
        ("]A0ITEM-42", {"valid": True, "type": "text", "code": "ITEM-42", "symbology": "CODE-39"}),
        ("\x00\x01\xfe\x07", {"valid": False, "reason": "garbled", "length": 4}),
        ("]", {"valid": False, "reason": "unrecognised", "length": 1}),  # found by the fuzzing suite: biip crashed
        ("]x" + "Jane Doe", {"valid": False, "reason": "unrecognised", "detail": "malformed symbology identifier "
                                                                              "(AIM prefix)"}),  # no scan text
    ],
)
def test_interpretation(text: str, expect: dict[str, Any]) -> None:
    got = interpret(text, BarcodeConfig())
    assert {k: got.get(k) for k in expect} == expect, got


def test_in_store_price_codes_with_a_configured_layout_and_with_biip_regions() -> None:
    layout = BarcodeConfig(rcn_layouts=[RcnLayout(prefixes=["20"], pattern="PPPPPPPCVVVV", measure="price")])
    good = interpret(price_code("12345", 1234), layout)
    assert good["type"] == "rcn" and good["rcn"] == {"item_reference": "12345", "price": "12.34"}
    # GTIN check digit right, price check digit wrong: a misprinted scale label, not a sellable code.
    bad = with_check_digit(price_code("12345", 1234)[:7] + "0" + price_code("12345", 1234)[8:12])
    assert interpret(bad, layout)["reason"] == "bad_measure_check_digit"
    # Without a layout, biip's national rules (Great Britain uses the same layout for prefix 20).
    assert interpret(price_code("12345", 1234), BarcodeConfig(rcn_region="gb"))["rcn"]["price"] == "12.34"
    with pytest.raises(ValueError, match="restricted-circulation"):
        RcnLayout(prefixes=["59"], pattern="PPPPPPPCVVVV", measure="price")


def test_framer_bounds_its_buffer_and_handles_split_terminators() -> None:
    f = Framer(b"\r\n", 64)
    assert f.feed(b"123\r", 0) == [] and f.feed(b"\n456\r\n", 0) == [b"123", b"456"]
    frames = f.feed(b"x" * 10_000, 0)  # 10 KB, no terminator: reported once, immediately, memory bounded
    assert frames == [Overlong(10_000)] and f.pending <= 1
    assert f.feed(b"y" * 5000, 0) == []  # still the same overlong line
    assert f.feed(b"tail\r\n96385074\r\n", 0) == [b"96385074"]  # the next terminator ends the bad line
    assert f.feed(b"z" * 100 + b"\r\n", 0) == [Overlong(100)]  # long line arriving with its terminator


def test_frames_outside_the_protocol() -> None:
    cfg = SerialScannerConfig.model_validate({"id": "s", "driver": "serial_scanner", "port": "/dev/null",
                                              "prefix": "\x02"})
    good, unprefixed = decode_frame(b"\x0296385074", cfg), decode_frame(b"96385074", cfg)
    assert good is not None and good["valid"] and good["gtin"] == "96385074"
    assert unprefixed is not None and unprefixed["reason"] == "missing_prefix"
    assert decode_frame(b"\n", cfg) is None  # a stray LF from a CRLF scanner on a CR port is not a scan


# -- the driver on a real pty, through a real gateway and broker -------------------------------------------------

def scanner_cfg(tmp_path: Path, port: int, **extra: Any) -> tuple[dict[str, Any], PtyScanner]:
    pty = PtyScanner(tmp_path / "scanner0")
    dev = {"id": "scanner0", "driver": "serial_scanner", "port": str(pty.link), "baudrate": 115200,
           "terminator": "CR", "max_length": 256, "rcn_region": "gb", "frame_timeout": 0.5} | extra
    return base_config(tmp_path, port, [dev]), pty


def scans(sub: Subscriber) -> list[dict[str, Any]]:
    return [e["data"] for e in sub.events(STORE) if e["kind"] == "scan"]


async def test_scans_good_and_bad_reach_head_office_and_noise_is_not_logged(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, pty = scanner_cfg(tmp_path, mosquitto.port)
    noise = bytes([0x00, 0xFF, 0x13, 0x80, 0xAA]) * 20
    async with running_gateway(cfg) as gw:
        handle = gw.supervisor.devices["scanner0"]
        await until(lambda: handle.state == Health.OK, what="scanner online")
        with caplog.at_level(logging.WARNING):
            pty.write(b"]E05901234123457\r")
            pty.write(b"]C1010590123412345710ABC123\x1d17250101\r")
            pty.write(price_code("12345", 250).encode() + b"\r")
            pty.write(b"5901234123458\r")           # bad check digit
            pty.write(noise + b"\r")                 # binary noise
            pty.write(b"9" * 10_240)                 # 10 KB without a terminator
            pty.write(b"\r96385074\r")               # ...then the scanner recovers
            pty.write(b"9638")                       # a partial scan, never terminated
            got = await until(lambda: len(scans(subscriber)) >= 8 and scans(subscriber), what="8 scans")
        assert handle.state == Health.OK and handle.restarts == 0
    assert [s["valid"] for s in got] == [True, True, True, False, False, False, True, False]
    assert got[0]["gtin"] == "5901234123457" and got[0]["symbology"] == "EAN-13"
    assert got[1]["ai"]["10"] == "ABC123"
    assert got[2]["type"] == "rcn" and Decimal(got[2]["rcn"]["price"]) == Decimal("2.50")
    assert [s.get("reason") for s in got[3:6]] == ["bad_check_digit", "garbled", "overlong"]
    assert got[5]["length"] > 256 and got[7]["reason"] == "unterminated"
    assert all("code" not in s for s in got[4:6])  # noise is never forwarded...
    text = caplog.text
    assert "rejected scan: garbled" in text and "rejected scan: overlong" in text
    assert "\\xff" not in text and "\xff" not in text and "9" * 300 not in text  # ...nor logged


async def test_unplugged_port_goes_offline_and_comes_back(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    cfg, pty = scanner_cfg(tmp_path, mosquitto.port)
    async with running_gateway(cfg) as gw:
        handle = gw.supervisor.devices["scanner0"]
        await until(lambda: handle.state == Health.OK, what="scanner online")
        pty.write(b"96385074\r")
        await until(lambda: len(scans(subscriber)) == 1, what="first scan")
        pty.unplug()
        await until(lambda: handle.state == Health.OFFLINE and handle.restarts >= 1, what="offline after unplug")
        assert "serial port" in (handle.last_error or "")
        assert gw.status()["devices"][0]["state"] == "offline"
        pty.plug()
        await until(lambda: handle.state == Health.OK, 15, what="back online after replug")
        pty.write(b"]E05901234123457\r")
        await until(lambda: len(scans(subscriber)) == 2, what="scan after replug")
    assert scans(subscriber)[1]["gtin"] == "5901234123457"
    states = [m for m in subscriber.json(f"storelink/{STORE}/devices/scanner0/state")]
    assert {"offline", "ok"} <= {s["state"] for s in states}


async def test_crlf_prefix_and_custom_framing(tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    cfg, pty = scanner_cfg(tmp_path, mosquitto.port, terminator="\x03", prefix="\x02", parity="even", bytesize=7)
    async with running_gateway(cfg) as gw:
        await until(lambda: gw.supervisor.devices["scanner0"].state == Health.OK)
        pty.write(b"\x02]E05901234123457\x03\x02]E4963850")
        pty.write(b"74\x03")  # a scan split across two reads
        await until(lambda: len(scans(subscriber)) == 2, what="two STX/ETX framed scans")
    assert [s["gtin"] for s in scans(subscriber)] == ["5901234123457", "96385074"]


async def test_a_run_of_rejected_scans_degrades_health_until_a_good_one(
    tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber
) -> None:
    cfg, pty = scanner_cfg(tmp_path, mosquitto.port)
    async with running_gateway(cfg) as gw:
        handle = gw.supervisor.devices["scanner0"]
        await until(lambda: handle.state == Health.OK, what="scanner online")
        for _ in range(5):  # what a scanner at 9600 baud looks like to a port set to 115200
            pty.write(b"\xf0\x0f\xe6\x18\x80\r")
        await until(lambda: handle.state == Health.DEGRADED, what="degraded after 5 rejected scans")
        assert "5 rejected scans in a row (last: garbled)" in (handle.last_error or "")
        pty.write(b"96385074\r")
        await until(lambda: handle.state == Health.OK, what="ok after a good scan")
    assert len(scans(subscriber)) == 6 and handle.restarts == 0


def test_config_errors_name_the_device_and_the_key(tmp_path: Path) -> None:
    from storelink.config import ConfigError, parse_config

    bad = [{"id": "scanner-1", "driver": "serial_scanner", "port": "/dev/ttyUSB0", "parity": "pink", "baud": 9600,
            "rcn_layouts": [{"prefixes": ["59"], "pattern": "PPPPPPPCVVVV", "measure": "price"}]},
           {"id": "mat-1", "driver": "kiosk_mat", "pin": 17, "debounce_s": 2, "leave_after_s": 1}]
    with pytest.raises(ConfigError) as err:
        parse_config(base_config(tmp_path, 1883, bad))
    text = err.value.render()
    assert "devices[0] (id='scanner-1').parity: Input should be 'none', 'even'" in text
    assert "devices[0] (id='scanner-1').baud: unknown key" in text
    assert "devices[0] (id='scanner-1').rcn_layouts[0].prefixes: prefix '59'" in text
    assert "devices[1] (id='mat-1')" in text and "leave_after_s must be at least debounce_s" in text


async def test_a_reader_thread_stuck_in_the_kernel_stops_the_watchdog_pings(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A USB serial driver that hangs inside read() cannot be cancelled from Python: only a restart of the process
    # cures it, so the reader thread is under the systemd watchdog (tests/test_watchdog.py covers the pings).
    import threading

    import serial

    import storelink.drivers.serial_scanner as serial_scanner

    monkeypatch.setattr(serial_scanner, "READER_MAX_SILENCE", 1.0)
    wedge, released = threading.Event(), threading.Event()
    real_read = serial.Serial.read

    def read(port: serial.Serial, size: int = 1) -> bytes:
        if wedge.is_set():
            released.wait(10)
        return real_read(port, size)

    monkeypatch.setattr(serial.Serial, "read", read)
    cfg, _pty = scanner_cfg(tmp_path, mosquitto.port)
    async with running_gateway(cfg) as gw:
        handle = gw.supervisor.devices["scanner0"]
        await until(lambda: handle.state == Health.OK, what="scanner online")
        part = "device scanner0 reader"
        assert part not in dict(gw.watchdog.stalled_parts())
        wedge.set()
        await until(lambda: part in dict(gw.watchdog.stalled_parts()), 5, what="the stuck reader to be noticed")
        wedge.clear()
        released.set()
        await until(lambda: part not in dict(gw.watchdog.stalled_parts()), 5, what="the reader beating again")
    assert part not in dict(gw.watchdog.stalled_parts())  # the stopped driver's thread is no longer watched
