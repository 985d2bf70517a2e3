"""`escpos_printer`: a receipt printer for kiosk slips, through python-escpos (network, serial, USB or a device
file such as /dev/usb/lp0 from the kernel's usblp driver).

A slip is rendered into bytes with python-escpos's Dummy printer (so the exact bytes are testable), then written
to the real connection in one go. Slips are not queued: a kiosk slip is for the customer standing at the kiosk,
printing it an hour later helps nobody and would keep their order on disk after the kiosk mat has purged the
session. A dead printer is a clear `PrinterUnavailable` for the kiosk to show, health offline, and an event.

The driver's loop asks network and serial printers for their real-time status (DLE EOT 1 and 4) every
`status_interval` seconds: no answer is offline, paper out or near its end is degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from storelink.drivers.base import (
    PYSERIAL,
    DeviceConfig,
    DeviceContext,
    Driver,
    Health,
    Requirement,
    plain_error,
)
from storelink.validation import TcpPort

if TYPE_CHECKING:
    from escpos.escpos import Escpos


def _import_escpos() -> None:
    """Import python-escpos on first use: it costs ~9 MB, and this module must import without the [escpos] extra
    (validating a config imports it, and names the missing extra). It also installs a stderr handler on the root
    logger, which doubled every log line and bypassed the journal handler's redaction: take that back out."""
    root = logging.getLogger()
    before = list(root.handlers)
    import escpos.printer  # noqa: F401

    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)

log = logging.getLogger(__name__)


class _QuietEscpos(logging.Filter):
    """python-escpos logs "Network printer enabled"/"Closing ..." at INFO on the root logger for every
    connection: with a status check every 30 s that is thousands of journal lines a day. A filter on the root
    logger only sees records logged through it directly, so this touches python-escpos's root-level calls only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}escpos{os.sep}" not in record.pathname


logging.getLogger().addFilter(_QuietEscpos())


class EscposPrinterConfig(DeviceConfig):
    driver: Literal["escpos_printer"] = "escpos_printer"
    connection: Literal["network", "serial", "usb", "file"] = "network"
    host: str | None = Field(None, description="printer address (network)")
    port: TcpPort = 9100
    serial_port: str | None = Field(None, description="for example /dev/ttyUSB0 (serial)")
    baudrate: int = Field(19200, ge=300, le=921600)
    usb_vendor_id: int | None = Field(None, ge=0, le=0xFFFF, description="USB id (usb; needs pyusb)")
    usb_product_id: int | None = Field(None, ge=0, le=0xFFFF)
    device_file: str | None = Field(None, description="for example /dev/usb/lp0 (file)")
    profile: str | None = Field(None, description="python-escpos capability profile, for example TM-T88V")
    columns: int | None = Field(None, ge=16, le=96, description="characters per line; default from the profile")
    timeout: float = Field(5.0, gt=0, le=60)
    status_interval: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _endpoint(self) -> EscposPrinterConfig:
        needed = {"network": ("host",), "serial": ("serial_port",), "usb": ("usb_vendor_id", "usb_product_id"),
                  "file": ("device_file",)}[self.connection]
        missing = [k for k in needed if getattr(self, k) is None]
        if missing:
            raise ValueError(f"{' and '.join(missing)} required when connection = {self.connection!r}")
        return self


class PrinterUnavailable(ConnectionError):
    """The slip was not printed; the message says why (for the kiosk screen and the logs)."""


def _barcode(p: Escpos, code: str) -> None:
    # python-escpos announces its renderer with print(); a gateway's stdout is not the place for that.
    from escpos.escpos import Escpos

    with contextlib.redirect_stdout(io.StringIO()):
        if re.fullmatch(r"\d{13}", code) and Escpos.check_barcode("EAN13", code):
            p.barcode(code, "EAN13", function_type="B", height=80, width=2)
        else:
            p.barcode("{B" + code, "CODE128", function_type="B", height=80, width=2)


def render_slip(title: str, lines: list[tuple[str, str]], barcode: str | None, footer: str,
                profile: str | None = None, columns: int | None = None) -> bytes:
    """The ESC/POS bytes of one order slip: title large and centred, `label ... value` lines, an optional
    barcode (EAN-13 when it is one, else Code 128), the footer, a cut."""
    _import_escpos()
    from escpos.printer import Dummy

    p = Dummy(profile=profile)
    cols = columns or int(p.profile.get_columns("a") or 42)
    p.set(align="center", bold=True, double_height=True, double_width=True)
    p.textln(title[: cols // 2])
    p.set_with_default()
    p.ln()
    for label, value in lines:
        value = value[:cols]
        room = max(cols - len(value) - 1, 0)
        p.textln(label[:room].ljust(room) + " " + value if room else value)
    p.textln("-" * cols)
    if barcode:
        if not re.fullmatch(r"[\x20-\x7e]{1,40}", barcode):
            raise ValueError(f"barcode must be 1-40 printable ASCII characters, got {barcode!r}")
        p.set(align="center")
        _barcode(p, barcode)
        p.set_with_default()
    if footer:
        p.set(align="center")
        for line in footer.splitlines():
            p.textln(line[:cols])
        p.set_with_default()
    p.cut()
    return bytes(p.output)


class EscposPrinter(Driver):
    config_model: ClassVar[type[DeviceConfig]] = EscposPrinterConfig
    requires: ClassVar[tuple[Requirement, ...]] = (Requirement("escpos", "escpos"),)

    @classmethod
    def requirements(cls, config: DeviceConfig) -> tuple[Requirement, ...]:
        assert isinstance(config, EscposPrinterConfig)
        return cls.requires + ((PYSERIAL,) if config.connection == "serial" else ())

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, EscposPrinterConfig)
        self.cfg = config
        self._io = asyncio.Lock()  # one conversation with the printer at a time

    def _open(self) -> Escpos:
        """A connected python-escpos printer for the configured connection (blocking)."""
        c = self.cfg
        _import_escpos()
        printer: Escpos
        if c.connection == "network":
            from escpos.printer import Network
            printer = Network(c.host, c.port, timeout=c.timeout, profile=c.profile)
        elif c.connection == "serial":
            from escpos.printer import Serial
            printer = Serial(c.serial_port, baudrate=c.baudrate, timeout=c.timeout, profile=c.profile)
        elif c.connection == "file":
            from escpos.printer import File
            printer = File(c.device_file, profile=c.profile)
        else:
            from escpos.printer import Usb
            if not Usb.is_usable():
                raise PrinterUnavailable("connection 'usb' needs pyusb (pip install pyusb); or use connection "
                                         "'file' with the kernel's /dev/usb/lp0")
            printer = Usb(c.usb_vendor_id, c.usb_product_id, profile=c.profile)
        try:
            printer.open()
        except Exception as err:
            raise PrinterUnavailable(f"{self._where()}: {plain_error(err)}") from err
        if getattr(printer, "device", None) is None:
            raise PrinterUnavailable(f"{self._where()}: could not open the printer")
        return printer

    def _where(self) -> str:
        c = self.cfg
        return {"network": f"{c.host}:{c.port}", "serial": str(c.serial_port), "file": str(c.device_file),
                "usb": f"usb {c.usb_vendor_id or 0:04x}:{c.usb_product_id or 0:04x}"}[c.connection]

    def _write(self, data: bytes) -> None:
        printer = self._open()
        try:
            printer._raw(data)
        except Exception as err:
            raise PrinterUnavailable(f"{self._where()}: write failed: {plain_error(err)}") from err
        finally:
            with contextlib.suppress(Exception):
                printer.close()

    def _status(self) -> tuple[Health, str | None]:
        printer = self._open()
        try:
            if not printer.is_online():
                return Health.OFFLINE, "printer reports offline (cover open or error)"
            paper = printer.paper_status()
        except (OSError, NotImplementedError) as err:
            raise PrinterUnavailable(f"{self._where()}: no status answer: {err or 'timed out'}") from err
        finally:
            with contextlib.suppress(Exception):
                printer.close()
        if paper == 0:
            return Health.DEGRADED, "paper out"
        if paper == 1:
            return Health.DEGRADED, "paper near its end"
        return Health.OK, None

    async def check(self) -> Health:
        """Ask the printer how it is (network and serial only: file and USB links cannot answer)."""
        if self.cfg.connection not in ("network", "serial"):
            return Health.OK
        async with self._io:
            try:
                state, error = await asyncio.to_thread(self._status)
            except PrinterUnavailable as err:
                state, error = Health.OFFLINE, str(err)
        self.ctx.set_health(state, error)
        if state != Health.OFFLINE:
            self.ctx.seen()
        return state

    async def run(self) -> None:
        self.ctx.set_health(Health.OFFLINE, "not checked yet")
        while True:
            if self.cfg.connection in ("network", "serial"):
                await self.check()
            else:
                self.ctx.set_health(Health.OK)
            await asyncio.sleep(self.cfg.status_interval)

    async def print_slip(self, title: str, lines: list[tuple[str, str]], barcode: str | None = None,
                         footer: str = "") -> None:
        """Print one kiosk slip now, or raise PrinterUnavailable (ValueError for a barcode it cannot print).
        The slip's text is never logged: it may carry a customer's order."""
        data = render_slip(title, lines, barcode, footer, self.cfg.profile, self.cfg.columns)
        async with self._io:
            try:
                await asyncio.to_thread(self._write, data)
            except PrinterUnavailable as err:
                self.ctx.set_health(Health.OFFLINE, str(err))
                log.warning("slip not printed: %s", err, extra={"device": self.cfg.id})
                await self.ctx.emit("device", {"event": "slip_failed", "error": str(err)})
                raise
        self.ctx.seen()
        await self.ctx.emit("device", {"event": "slip_printed", "bytes": len(data)})

    def status(self) -> dict[str, Any]:
        return {"connection": self.cfg.connection, "where": self._where()}
