"""`zpl_printer`: shelf labels in ZPL II on a Zebra-compatible printer, over raw TCP (port 9100) or serial.

Port 9100 never acknowledges anything, so the printer's own `~HS` host status is the only evidence: the driver
asks after every write and between jobs. A printer that does not answer within `status_timeout` is offline (a
printer with the head open or the media out may not answer at all); one that answers with paper out, head
open, ribbon out or pause is degraded and keeps the formats it already received, printing them when fixed.

Jobs live in a SQLite queue (drivers/label_queue.py) beside the gateway's database and survive restarts. A job
is marked printed only after its bytes were written and later `~HS` answers (two in a row) show the printer
healthy with nothing left in its buffer. Delivery is at-least-once (see label_queue for why).

As a LabelPriceTarget (price_role "label"): prepare renders and queues the changed items' labels (a scheduled
change's labels are printed ahead, marked "valid from" its effective time); confirmed(v) is true once every
label of v is printed; abort cancels v's unsent labels and queues the previous label again for items whose new
label was (or may have been) printed; label_states / restored say per item what the shelf is known to show;
reprint queues the labels in force again as jobs of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from storelink.drivers.base import (
    PYSERIAL,
    DeviceConfig,
    DeviceContext,
    Driver,
    Health,
    LabelShows,
    PrepareFailed,
    PriceChange,
    Requirement,
    plain_error,
)
from storelink.drivers.label_queue import LabelQueue, NewLabel
from storelink.drivers.zpl_label import (
    HOST_STATUS_QUERY,
    HostStatus,
    HostStatusError,
    LabelLayout,
    complete_frames,
    parse_host_status,
    render_label,
)
from storelink.validation import TcpPort

log = logging.getLogger(__name__)


class ZplPrinterConfig(DeviceConfig):
    driver: Literal["zpl_printer"] = "zpl_printer"
    connection: Literal["tcp", "serial"] = "tcp"
    host: str | None = Field(None, description="printer address (connection = tcp)")
    port: TcpPort = 9100
    serial_port: str | None = Field(None, description="for example /dev/ttyUSB0 (connection = serial)")
    baudrate: int = Field(9600, ge=300, le=921600)
    layout: LabelLayout = Field(default_factory=LabelLayout)  # type: ignore[arg-type]
    status_timeout: float = Field(3.0, gt=0, le=60, description="seconds to wait for the ~HS answer")
    poll_interval: float = Field(15.0, gt=0, le=3600, description="seconds between ~HS checks when idle")
    retry_interval: float = Field(2.0, gt=0, le=600, description="seconds between checks while in trouble")
    confirm_interval: float = Field(0.3, gt=0, le=10, description="seconds between ~HS while labels print")
    batch: int = Field(20, ge=1, le=500, description="labels written per connection")
    swap_seconds: float = Field(300.0, ge=0, le=86400, description="seconds after its valid-from time until a label "
                                "printed ahead counts as on the shelf (until then tills keep the old price if lower)")
    queue_path: Path | None = Field(None, description="job queue file; default zpl-{id}.db beside the gateway db")

    @model_validator(mode="after")
    def _endpoint(self) -> ZplPrinterConfig:
        if self.connection == "tcp" and not self.host:
            raise ValueError("host is required when connection = 'tcp'")
        if self.connection == "serial" and not self.serial_port:
            raise ValueError("serial_port is required when connection = 'serial'")
        return self


class PrinterUnreachable(ConnectionError):
    """No connection (refused, unplugged) or no ~HS answer in time."""


class PrinterNotConnected(PrinterUnreachable):
    """Not even connected: not a byte of the labels can have reached the printer."""


class _TcpLink:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    async def exchange(self, data: bytes, timeout: float) -> bytes:
        """Write `data` then `~HS` on one connection; return the status answer."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as err:
            raise PrinterNotConnected(f"cannot connect to {self.host}:{self.port}: {plain_error(err)}") from err
        try:
            writer.write(data + HOST_STATUS_QUERY)
            async with asyncio.timeout(timeout):
                await writer.drain()
            answer = b""
            deadline = time.monotonic() + timeout
            while complete_frames(answer) < 3:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PrinterUnreachable(f"no answer to ~HS within {timeout:g}s (printer silent)")
                async with asyncio.timeout(left):
                    chunk = await reader.read(1024)
                if not chunk:
                    raise PrinterUnreachable("printer closed the connection without answering ~HS")
                answer += chunk
            return answer
        except TimeoutError as err:
            raise PrinterUnreachable(f"no answer to ~HS within {timeout:g}s (printer silent)") from err
        except OSError as err:
            raise PrinterUnreachable(f"connection to {self.host}:{self.port} failed: {plain_error(err)}") from err
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    def close(self) -> None:
        pass


class _SerialLink:
    def __init__(self, port: str, baudrate: int):
        self.port, self.baudrate = port, baudrate
        self._ser: Any = None

    async def exchange(self, data: bytes, timeout: float) -> bytes:
        return await asyncio.to_thread(self._exchange, data, timeout)

    def _exchange(self, data: bytes, timeout: float) -> bytes:
        import serial

        try:
            if self._ser is None:
                self._ser = serial.Serial(self.port, self.baudrate, timeout=0.1, write_timeout=timeout)
            self._ser.reset_input_buffer()
            self._ser.write(data + HOST_STATUS_QUERY)
            self._ser.flush()
            answer = b""
            deadline = time.monotonic() + timeout
            while complete_frames(answer) < 3 and time.monotonic() < deadline:
                answer += self._ser.read(256)
        except (serial.SerialException, OSError) as err:
            self.close()
            raise PrinterUnreachable(f"serial port {self.port}: {plain_error(err)}") from err
        if complete_frames(answer) < 3:
            raise PrinterUnreachable(f"no answer to ~HS within {timeout:g}s (printer silent)")
        return answer

    def close(self) -> None:
        if self._ser is not None:
            with contextlib.suppress(Exception):
                self._ser.close()
            self._ser = None


class ZplPrinter(Driver):
    config_model: ClassVar[type[DeviceConfig]] = ZplPrinterConfig
    price_role = "label"

    @classmethod
    def requirements(cls, config: DeviceConfig) -> tuple[Requirement, ...]:
        assert isinstance(config, ZplPrinterConfig)
        return (PYSERIAL,) if config.connection == "serial" else ()

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, ZplPrinterConfig)
        self.cfg = config
        self.link: _TcpLink | _SerialLink = (
            _TcpLink(config.host or "", config.port) if config.connection == "tcp"
            else _SerialLink(config.serial_port or "", config.baudrate)
        )
        self.last_status: HostStatus | None = None
        self._queue: LabelQueue | None = None
        self._queue_lock = asyncio.Lock()
        self._wake = asyncio.Event()

    # the queue ----------------------------------------------------------------------------------------------
    def queue_path(self) -> Path:
        if self.cfg.queue_path is not None:
            return self.cfg.queue_path
        return self.ctx.data_dir / f"zpl-{self.cfg.id}.db"

    async def queue(self) -> LabelQueue:
        """Opened on first use (by run() or by the price coordinator, whichever comes first)."""
        async with self._queue_lock:
            if self._queue is None:
                self._queue = await asyncio.to_thread(LabelQueue, self.queue_path(), self.ctx.storage_sync)
                resent = await asyncio.to_thread(self._queue.recover)
                if resent:
                    log.warning("%d label(s) whose printing was not confirmed before a restart will print again",
                                resent, extra={"device": self.cfg.id})
            return self._queue

    # the printer loop ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        queue = await self.queue()
        self.ctx.set_health(Health.OFFLINE, "no ~HS answer yet")
        idle_answers = 0
        try:
            while True:
                try:
                    status = parse_host_status(await self.link.exchange(b"", self.cfg.status_timeout))
                except (PrinterUnreachable, HostStatusError) as err:
                    idle_answers = 0
                    self.last_status = None
                    requeued = await asyncio.to_thread(queue.requeue_sent, f"unconfirmed: {err}")
                    self.ctx.set_health(Health.OFFLINE, str(err))
                    if requeued:
                        log.warning("%d label(s) written but not confirmed will be sent again", requeued,
                                    extra={"device": self.cfg.id})
                    await self._pause(self.cfg.retry_interval)
                    continue
                self.ctx.seen()
                self.last_status = status
                if not status.healthy:
                    idle_answers = 0
                    self.ctx.set_health(Health.DEGRADED, ", ".join(status.problems()))
                    await self._pause(self.cfg.retry_interval)
                    continue
                self.ctx.set_health(Health.OK)
                if await asyncio.to_thread(queue.has_sent):
                    idle_answers = idle_answers + 1 if status.idle else 0
                    if idle_answers >= 2:  # two healthy, empty-buffer answers in a row after the write
                        await self._printed(queue)
                        idle_answers = 0
                    else:
                        await asyncio.sleep(self.cfg.confirm_interval)
                    continue
                if await self._send_batch(queue):
                    idle_answers = 0
                    continue
                await self._pause(self.cfg.poll_interval)
        finally:
            self.link.close()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    async def _send_batch(self, queue: LabelQueue) -> bool:
        jobs = await asyncio.to_thread(queue.take, self.cfg.batch)
        if not jobs:
            return False
        try:
            answer = await self.link.exchange(b"".join(j.payload for j in jobs), self.cfg.status_timeout)
            status = parse_host_status(answer)
        except (PrinterUnreachable, HostStatusError) as err:
            # The bytes may or may not have arrived; they are sent again once the printer answers (at-least-once).
            await asyncio.to_thread(queue.requeue_sent, f"write failed: {err}",
                                    not isinstance(err, PrinterNotConnected))
            self.ctx.set_health(Health.OFFLINE, str(err))
            await self.ctx.emit("label", {"event": "print_failed", "labels": len(jobs), "error": str(err)})
            await self._pause(self.cfg.retry_interval)
            return True
        self.last_status = status
        if not status.healthy:
            self.ctx.set_health(Health.DEGRADED, ", ".join(status.problems()))
        return True

    async def _printed(self, queue: LabelQueue) -> None:
        done = await asyncio.to_thread(queue.mark_sent_printed)
        versions = sorted({j.version for j in done})
        log.info("%d label(s) printed (price versions %s)", len(done), versions, extra={"device": self.cfg.id})
        await self.ctx.emit("label", {
            "event": "printed", "labels": len(done), "versions": versions,
            "restored": sum(1 for j in done if j.kind == "restore"),
        })

    def status(self) -> dict[str, Any]:
        return {"printer": None if self.last_status is None else {
            "problems": self.last_status.problems(), "formats_in_buffer": self.last_status.formats_in_buffer,
            "labels_remaining": self.last_status.labels_remaining},
            "jobs": self._queue.counts() if self._queue else None}

    # PriceTarget --------------------------------------------------------------------------------------------
    def _render(self, change: PriceChange, valid_from: str | None = None) -> tuple[list[NewLabel], list[str]]:
        labels: list[NewLabel] = []
        problems: list[str] = []
        for item in change.changed:
            payload, item_problems = render_label(item, change.currency, change.version, self.cfg.layout,
                                                  valid_from)
            problems += item_problems
            labels.append(NewLabel(item.sku, payload, "; ".join(item_problems) or None))
        return labels, problems

    async def price_prepare(self, change: PriceChange) -> None:
        ahead = change.effective_at is not None and change.effective_at > time.time()
        valid_from = _local_time(change.effective_at) if ahead and change.effective_at is not None else None
        problems: list[str] = []  # the first 50 (reported); each label keeps its own in its note
        count = 0

        def labels() -> Iterator[NewLabel]:
            # Rendered one at a time in the worker thread as the queue stores them: 100,000 labels (v1 of a big
            # book) never sit in memory together, and the loop does not render.
            nonlocal count
            for item in change.changed:
                payload, item_problems = render_label(item, change.currency, change.version, self.cfg.layout,
                                                      valid_from)
                count += len(item_problems)
                problems.extend(item_problems[:50 - len(problems)])
                yield NewLabel(item.sku, payload, "; ".join(item_problems) or None)

        queue = await self.queue()
        try:
            added = await asyncio.to_thread(queue.prepare, change.version, labels(),
                                            change.effective_at if ahead else None)
        except (ValueError, sqlite3.Error) as err:
            raise PrepareFailed(f"{self.cfg.id}: cannot queue labels for version {change.version}: {err}") from err
        if problems:
            log.warning("version %d: %s", change.version, "; ".join(problems[:10]), extra={"device": self.cfg.id})
            await self.ctx.emit("label", {"event": "render_problems", "version": change.version,
                                          "problems": problems, "count": count})
        log.info("version %d: %d label(s) queued", change.version, added, extra={"device": self.cfg.id})
        self._wake.set()

    async def price_commit(self, version: int) -> None:
        await asyncio.to_thread((await self.queue()).commit, version)

    async def price_abort(self, version: int) -> None:
        cancelled, restored, unknown, void = await asyncio.to_thread((await self.queue()).abort, version)
        if unknown:
            log.warning("version %d aborted; no earlier label known for %d printed item(s): %s", version,
                        len(unknown), ", ".join(unknown[:20]), extra={"device": self.cfg.id})
        if void:
            log.warning("version %d aborted before its valid-from time: throw its labels printed ahead away",
                        version, extra={"device": self.cfg.id})
        if cancelled or restored or unknown or void:
            await self.ctx.emit("label", {"event": "aborted", "version": version, "cancelled": cancelled,
                                          "restore_queued": restored, "no_earlier_label": unknown[:50],
                                          "void": void})
        self._wake.set()

    async def price_label_states(self, version: int) -> dict[str, LabelShows]:
        return await asyncio.to_thread((await self.queue()).label_states, version, self.cfg.swap_seconds)

    async def price_restored(self, version: int) -> bool:
        return all(v == "old" for v in (await self.price_label_states(version)).values())

    async def price_reprint(self, request_id: str, change: PriceChange) -> int:
        labels, _problems = await asyncio.to_thread(self._render, change)
        n = await asyncio.to_thread((await self.queue()).reprint, change.version, labels, request_id)
        log.info("reprint %s: %d label(s) queued", request_id, n, extra={"device": self.cfg.id})
        self._wake.set()
        return n

    async def price_confirmed(self, version: int) -> bool:
        return await asyncio.to_thread((await self.queue()).confirmed, version, self.cfg.swap_seconds)

    async def price_reported_version(self) -> int | None:
        return await asyncio.to_thread((await self.queue()).latest_confirmed)

    async def price_labels_left(self, version: int) -> tuple[int, int]:
        return await asyncio.to_thread((await self.queue()).labels_left, version)


def _local_time(ts: float) -> str:
    """The store's local time, as the person changing the shelf reads it (seconds only when not on the minute)."""
    when = datetime.fromtimestamp(ts)
    return when.strftime("%Y-%m-%d %H:%M" if when.second == 0 else "%Y-%m-%d %H:%M:%S")
