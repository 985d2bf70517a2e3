"""A fake Zebra label printer for tests and `storelink demo`: records the ZPL formats it receives and answers
`~HS` with the real three STX...ETX strings. It can be told to run out of paper, open its head, pause, go
silent (takes bytes, answers nothing, loses what it was sent) or refuse connections.

The protocol core (`FakeZplCore.feed`) is transport-free so the same printer sits behind TCP or a pty.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Callable

from storelink.drivers.zpl_label import HostStatus, host_status_answer

_TOKEN = re.compile(rb"~HS|\^XA.*?\^XZ", re.S)


class FakeZplCore:
    def __init__(self, print_seconds: float = 0.0):
        self.print_seconds = print_seconds  # time each label takes to come out
        self.printed: list[bytes] = []  # formats that came out of the printer, in order
        self.dropped: list[bytes] = []  # formats a silent printer swallowed
        self.pending: list[tuple[float, bytes]] = []  # (ready_at, format) still in the receive buffer
        self.status_queries = 0
        self.paper_out = self.head_open = self.paused = self.ribbon_out = False
        self.silent = False
        self.on_print: list[Callable[[bytes], None]] = []  # called with each format as it comes out
        self._buf = b""

    @property
    def faulty(self) -> bool:
        return self.paper_out or self.head_open or self.paused or self.ribbon_out

    def advance(self) -> None:
        """Print whatever is due, unless a fault stops the printer (it keeps the formats meanwhile)."""
        if self.faulty:
            return
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            self.printed.append(self.pending.pop(0)[1])
            for callback in self.on_print:
                callback(self.printed[-1])
            if self.pending:  # the next label starts only once this one is out
                self.pending[0] = (max(self.pending[0][0], now + self.print_seconds), self.pending[0][1])

    def hurry(self) -> None:
        """Everything in the buffer is due now (the test does not want to wait for slow labels)."""
        self.print_seconds = 0.0
        self.pending = [(0.0, f) for _, f in self.pending]

    def power_cycle(self, silent: bool = True) -> int:
        """Lose every format not yet printed (a printer switched off mid-batch); returns how many were lost."""
        lost = [f for _, f in self.pending]
        self.dropped += lost
        self.pending.clear()
        self.silent = silent
        return len(lost)

    def status(self) -> HostStatus:
        self.advance()
        return HostStatus(
            paper_out=self.paper_out, paused=self.paused, buffer_full=False,
            formats_in_buffer=len(self.pending), partial_format=False, corrupt_ram=False,
            under_temperature=False, over_temperature=False, head_open=self.head_open,
            ribbon_out=self.ribbon_out, labels_remaining=len(self.pending),
        )

    def feed(self, data: bytes) -> bytes:
        """Bytes from the host in, the printer's answer out (only ~HS produces one)."""
        self._buf += data
        out = b""
        while True:
            m = _TOKEN.search(self._buf)
            if not m:
                break
            self._buf = self._buf[m.end():]
            if m.group(0) == b"~HS":
                self.status_queries += 1
                if not self.silent:
                    out += host_status_answer(self.status())
            elif self.silent:
                self.dropped.append(m.group(0))
            else:
                ready = max([time.monotonic()] + [t for t, _ in self.pending]) + self.print_seconds
                self.pending.append((ready, m.group(0)))
                self.advance()
        if len(self._buf) > 1 << 20:  # garbage without a format end: a real printer discards it too
            self._buf = b""
        return out

    def printed_fields(self) -> list[list[str]]:
        """The ^FD texts of each printed label (after ^FH_ hex escapes are undone)."""
        out = []
        for fmt in self.printed:
            fields = re.findall(rb"\^FD(.*?)\^FS", fmt, re.S)
            out.append([re.sub(r"_([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), f.decode()) for f in fields])
        return out


class FakeZplPrinter:
    """The core behind a TCP listener on loopback (raw port-9100 style)."""

    def __init__(self, core: FakeZplCore | None = None, host: str = "127.0.0.1", port: int = 0):
        self.core = core or FakeZplCore()
        self.host = host
        self._sock = socket.create_server((host, port))
        self.port = int(self._sock.getsockname()[1])
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> FakeZplPrinter:
        if self._server is None:
            if self._sock.fileno() == -1:
                self._sock = socket.create_server((self.host, self.port))
            self._server = await asyncio.start_server(self._handle, sock=self._sock)
        return self

    async def refuse(self) -> None:
        """Stop listening: connections are refused until start() again (a printer switched off)."""
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):
                w.close()
            await self._server.wait_closed()
            self._server = None
        self._sock.close()

    async def stop(self) -> None:
        await self.refuse()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while data := await reader.read(4096):
                answer = self.core.feed(data)
                if answer:
                    writer.write(answer)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
