"""escpos_printer: the exact ESC/POS bytes of a known slip (python-escpos Dummy, and over a fake network printer
on loopback), status polling, and a dead printer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storelink.drivers.base import Health
from storelink.drivers.escpos_printer import EscposPrinter, EscposPrinterConfig, PrinterUnavailable, render_slip
from storelink.drivers.sim.escpos_printer import FakeEscposPrinter
from tests.label_harness import RecordingContext, until

SLIP = ("ORDER 1042", [("Pickup bay", "7"), ("Items", "3"), ("Total", "EUR 23.47")], "W100042",
        "Thank you!\nShow this slip at the counter")

RESET = b"\x1b!\x00\x1b!\x00\x1b!\x00\x1b{\x00\x1db\x00\x1bE\x00\x1b-\x00\x1bM\x00\x1ba\x00\x1dB\x00"
GOLDEN = (
    b"\x1b!\x00\x1b!\x00\x1b!0"  # ESC ! 0x30: double width and height
    b"\x1bE\x01\x1ba\x01\x1bt\x00"  # bold, centred, code page 0
    b"ORDER 1042\n" + RESET + b"\n"
    b"Pickup bay                               7\n"
    b"Items                                    3\n"
    b"Total                            EUR 23.47\n"
    + b"-" * 42 + b"\n"
    b"\x1ba\x01\x1ba\x01"  # centred
    b"\x1dhP\x1dw\x02\x1df\x00\x1dH\x02"  # GS h 80 dots high, GS w 2, HRI font A below
    b"\x1dkI\t{BW100042"  # GS k 73 (Code 128), 9 bytes: code set B + data
    + RESET + b"\x1ba\x01Thank you!\nShow this slip at the counter\n" + RESET
    + b"\x1bd\x06\x1dV\x00"  # feed 6 lines, full cut
)


def make_driver(tmp_path: Path, **cfg: object) -> tuple[EscposPrinter, RecordingContext]:
    config = EscposPrinterConfig.model_validate({"id": "slips-1", "driver": "escpos_printer", "timeout": 1.0,
                                                 **cfg})
    ctx = RecordingContext(tmp_path, "slips-1")
    return EscposPrinter(config, ctx), ctx


@pytest.fixture
async def printer() -> AsyncIterator[FakeEscposPrinter]:
    p = await FakeEscposPrinter().start()
    yield p
    await p.stop()


def test_golden_bytes_of_a_known_slip() -> None:
    assert render_slip(*SLIP) == GOLDEN


def test_ean13_barcode_and_long_lines() -> None:
    data = render_slip("X", [("A very long label that cannot fit beside its value", "12345")], "4006381333931", "")
    assert b"\x1dkC\r4006381333931" in data  # GS k 67 (EAN-13), 13 digits
    assert b"A very long label that cannot fit be 12345\n" in data  # cut to 42 columns, value kept
    with pytest.raises(ValueError, match="printable ASCII"):
        render_slip("X", [], "bad\ncode", "")


async def test_slip_over_the_network_is_byte_exact(tmp_path: Path, printer: FakeEscposPrinter) -> None:
    driver, ctx = make_driver(tmp_path, host="127.0.0.1", port=printer.port)
    await driver.print_slip(*SLIP)
    await until(lambda: printer.jobs, what="the printer saw the connection close")
    assert printer.jobs == [GOLDEN]
    assert ctx.events[-1] == ("device", {"event": "slip_printed", "bytes": len(GOLDEN)})


async def test_dead_printer_is_a_clear_error_offline_and_reported(tmp_path: Path,
                                                                 printer: FakeEscposPrinter) -> None:
    await printer.stop()
    driver, ctx = make_driver(tmp_path, host="127.0.0.1", port=printer.port)
    with pytest.raises(PrinterUnavailable, match=f"127.0.0.1:{printer.port}"):
        await driver.print_slip(*SLIP)
    assert ctx.state == Health.OFFLINE and "127.0.0.1" in (ctx.error or "")
    kind, event = ctx.events[-1]
    assert kind == "device" and event["event"] == "slip_failed" and "ORDER" not in str(event)


async def test_status_polling(tmp_path: Path, printer: FakeEscposPrinter) -> None:
    driver, ctx = make_driver(tmp_path, host="127.0.0.1", port=printer.port)
    assert await driver.check() == Health.OK
    printer.paper_low = True
    assert await driver.check() == Health.DEGRADED and ctx.error == "paper near its end"
    printer.paper_out = True
    assert await driver.check() == Health.DEGRADED and ctx.error == "paper out"
    printer.cover_open = True
    assert await driver.check() == Health.OFFLINE and "offline" in (ctx.error or "")
    printer.silent = True
    assert await driver.check() == Health.OFFLINE and "no status answer" in (ctx.error or "")
    printer.silent = printer.cover_open = printer.paper_out = printer.paper_low = False
    assert await driver.check() == Health.OK
    assert printer.jobs == []  # status requests are not printed


async def test_usb_without_pyusb_and_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="host required"):
        EscposPrinterConfig.model_validate({"id": "p", "driver": "escpos_printer"})
    with pytest.raises(ValueError, match="usb_vendor_id and usb_product_id required"):
        EscposPrinterConfig.model_validate({"id": "p", "driver": "escpos_printer", "connection": "usb"})
    dev = tmp_path / "lp0"
    dev.write_bytes(b"")
    driver, _ = make_driver(tmp_path, connection="file", device_file=str(dev))
    await driver.print_slip(*SLIP)
    assert dev.read_bytes() == GOLDEN  # the kernel's usblp device file path
    usb, _ = make_driver(tmp_path, connection="usb", usb_vendor_id=0x04B8, usb_product_id=0x0202)
    try:
        import usb as _pyusb  # noqa: F401
    except ImportError:
        with pytest.raises(PrinterUnavailable, match="pyusb"):
            await usb.print_slip(*SLIP)
