"""Serial (RS-232 / USB CDC-ACM) barcode scanners: frames the byte stream into scans and reports each one.

The port is read by a thread (pyserial is blocking); chunks reach the event loop through
``loop.call_soon_threadsafe``. A read error (the USB cable pulled, the pty closed) ends ``run()`` with the error,
so the supervisor marks the device offline and reopens the port with backoff until it is back.

Framing is bounded: a line longer than ``max_length`` without its terminator is reported once as ``overlong``
and the rest of it is dropped up to the next terminator, so a scanner spewing noise cannot grow our memory.
A partial scan left without its terminator for ``frame_timeout`` seconds is reported as ``unterminated`` (what
a scanner set to send LF looks like when we wait for CR).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from storelink.drivers.barcodes import BarcodeConfig, ScanReporter, interpret, invalid, warm_up
from storelink.drivers.base import PYSERIAL, DeviceConfig, DeviceContext, Driver, Health, Requirement

if TYPE_CHECKING:
    import serial

log = logging.getLogger(__name__)

TERMINATORS = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n", "ETX": b"\x03", "TAB": b"\t"}
# The reader thread loops at least every 0.5 s (the read timeout); silent this long, it is stuck in the kernel.
READER_MAX_SILENCE = 10.0
PARITIES = {"none": "N", "even": "E", "odd": "O", "mark": "M", "space": "S"}  # pyserial's PARITY_* values


class SerialScannerConfig(DeviceConfig, BarcodeConfig):
    driver: Literal["serial_scanner"] = "serial_scanner"
    port: str = Field(description="device path; prefer a stable /dev/serial/by-id/... link")
    baudrate: int = Field(9600, ge=50, le=4_000_000)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: float = Field(1, description="1, 1.5 or 2")
    rtscts: bool = False
    xonxoff: bool = False
    terminator: str = Field("CR", description='"CR", "LF", "CRLF", "ETX", "TAB" or the literal characters')
    prefix: str = Field("", description="characters the scanner sends before each scan (stripped; required)")
    frame_timeout: float = Field(2.0, ge=0, description="seconds before a partial scan is `unterminated` (0: never)")

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, v: float) -> float:
        if v not in (1, 1.5, 2):
            raise ValueError("stopbits must be 1, 1.5 or 2")
        return v

    @field_validator("terminator")
    @classmethod
    def _terminator_not_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("terminator must not be empty")
        if v not in TERMINATORS and not v.isascii():
            raise ValueError("a custom terminator must be ASCII characters")
        return v

    @property
    def terminator_bytes(self) -> bytes:
        return TERMINATORS.get(self.terminator) or self.terminator.encode("ascii")


@dataclass(frozen=True, slots=True)
class Overlong:
    length: int


@dataclass(frozen=True, slots=True)
class Unterminated:
    length: int


Frame = bytes | Overlong | Unterminated


class Framer:
    """Splits a byte stream on a terminator with a bounded buffer (never more than ``max_length`` bytes)."""

    def __init__(self, terminator: bytes, max_length: int):
        self.terminator = terminator
        self.max_length = max_length
        self._buf = bytearray()
        self._discarding = False  # inside an overlong line, dropping bytes up to the next terminator
        self.partial_since: float | None = None

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes, now: float) -> list[Frame]:
        frames: list[Frame] = []
        self._buf += chunk
        while True:
            end = self._buf.find(self.terminator)
            if end < 0:
                break
            line = bytes(self._buf[:end])
            del self._buf[: end + len(self.terminator)]
            if self._discarding:
                self._discarding = False
                continue
            frames.append(Overlong(len(line)) if len(line) > self.max_length else line)
        if len(self._buf) > self.max_length:
            if not self._discarding:
                frames.append(Overlong(len(self._buf)))
                self._discarding = True
            # Keep only what could be the start of a split terminator.
            keep = len(self.terminator) - 1
            del self._buf[: len(self._buf) - keep]
        if self._buf and not self._discarding:
            if self.partial_since is None:
                self.partial_since = now
        else:
            self.partial_since = None
        return frames

    def flush_partial(self) -> Unterminated | None:
        """Drop a partial line (its terminator never came); what to report about it, if anything."""
        self.partial_since = None
        length, discarding = len(self._buf), self._discarding
        self._buf.clear()
        self._discarding = False
        return None if discarding or not length else Unterminated(length)


def decode_frame(frame: Frame, config: SerialScannerConfig) -> dict[str, Any] | None:
    """The scan event data for one frame, or None for an empty line (a stray CR/LF is not a scan)."""
    if isinstance(frame, Overlong):
        return invalid("overlong", f"no terminator within {config.max_length} bytes; dropped to the next one",
                       frame.length)
    if isinstance(frame, Unterminated):
        return invalid("unterminated", f"no terminator within {config.frame_timeout}s (framing misconfigured?)",
                       frame.length)
    # A scanner sending CRLF to a port set to CR (or the reverse) leaves a stray LF/CR at an edge: not data.
    frame = frame.strip(b"\r\n")
    if not frame:
        return None
    prefix = config.prefix.encode("ascii", "replace")
    if prefix:
        if not frame.startswith(prefix):
            return invalid("missing_prefix", "scan does not start with the configured prefix", len(frame))
        frame = frame[len(prefix):]
    # latin-1 maps every byte to one character, so noise is judged (and counted) byte by byte, never raised on.
    return interpret(frame.decode("latin-1"), config)


class SerialScanner(Driver):
    config_model: ClassVar[type[DeviceConfig]] = SerialScannerConfig
    requires: ClassVar[tuple[Requirement, ...]] = (PYSERIAL,)
    config: SerialScannerConfig

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        assert isinstance(config, SerialScannerConfig)
        super().__init__(config, ctx)
        self.reporter = ScanReporter(ctx, log)

    def _open(self) -> serial.Serial:
        import serial  # here: this module must import without pyserial, so config validation can name the extra

        c = self.config
        return serial.Serial(
            c.port, baudrate=c.baudrate, bytesize=c.bytesize, parity=PARITIES[c.parity], stopbits=c.stopbits,
            rtscts=c.rtscts, xonxoff=c.xonxoff, timeout=0.5, exclusive=True,
        )

    async def run(self) -> None:
        await asyncio.to_thread(warm_up)
        port = await asyncio.to_thread(self._open)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes] | BaseException] = asyncio.Queue()
        stop = threading.Event()
        beat = self.ctx.watch_thread("reader", READER_MAX_SILENCE)
        reader = threading.Thread(target=self._read_port, args=(port, loop, chunks, stop, beat),
                                  name=f"serial-{self.config.id}", daemon=True)
        reader.start()
        self.ctx.set_health(Health.OK)
        log.info("scanner %s listening on %s", self.config.id, self.config.port, extra={"device": self.config.id})
        try:
            await self._consume(chunks)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                port.cancel_read()
            await asyncio.to_thread(reader.join, 2.0)
            self.ctx.unwatch_thread("reader")
            with contextlib.suppress(Exception):
                port.close()

    @staticmethod
    def _read_port(port: serial.Serial, loop: asyncio.AbstractEventLoop,
                   out: asyncio.Queue[tuple[float, bytes] | BaseException], stop: threading.Event,
                   beat: Callable[[], None]) -> None:
        while not stop.is_set():
            beat()  # every round, idle ones too: read() returns after its 0.5 s timeout
            try:
                data = port.read(max(1, port.in_waiting))
            except Exception as err:  # SerialException / OSError: the device went away
                if not stop.is_set():
                    loop.call_soon_threadsafe(out.put_nowait, err)
                return
            if data:
                loop.call_soon_threadsafe(out.put_nowait, (time.monotonic(), data))

    async def _consume(self, chunks: asyncio.Queue[tuple[float, bytes] | BaseException]) -> None:
        framer = Framer(self.config.terminator_bytes, self.config.max_length)
        timeout = self.config.frame_timeout
        while True:
            frames: list[Frame] = []
            wait: float | None = None
            if timeout and framer.partial_since is not None:
                wait = max(0.0, framer.partial_since + timeout - time.monotonic())
            try:
                async with asyncio.timeout(wait):
                    item = await chunks.get()
            except TimeoutError:
                leftover = framer.flush_partial()
                if leftover is not None:
                    frames.append(leftover)
            else:
                # Take everything that queued up meanwhile: one batch, one outbox commit.
                items = [item]
                while not chunks.empty():
                    items.append(chunks.get_nowait())
                for it in items:
                    if isinstance(it, BaseException):
                        await self._report(frames)
                        raise ConnectionError(f"serial port {self.config.port}: {it}") from it
                    frames += framer.feed(it[1], it[0])
            await self._report(frames)

    async def _report(self, frames: list[Frame]) -> None:
        results = [r for r in (decode_frame(f, self.config) for f in frames) if r is not None]
        await self.reporter.report(results)
