"""A fake network receipt printer (ESC/POS over raw TCP) for tests and `storelink demo`: records the bytes of
each connection as one job and answers the real-time status requests DLE EOT 1 (printer) and DLE EOT 4 (paper
sensor) the way Epson-compatible printers do. It can run out of paper, open its cover, go silent or refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

DLE_EOT_PRINTER = b"\x10\x04\x01"
DLE_EOT_PAPER = b"\x10\x04\x04"


class FakeEscposPrinter:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self._sock = socket.create_server((host, port))
        self.port = int(self._sock.getsockname()[1])
        self.jobs: list[bytes] = []  # everything but status requests, one entry per connection that sent some
        self.status_requests = 0
        self.paper_out = self.paper_low = self.cover_open = self.silent = False
        self._server: asyncio.Server | None = None

    async def start(self) -> FakeEscposPrinter:
        if self._sock.fileno() == -1:
            self._sock = socket.create_server((self.host, self.port))
        self._server = await asyncio.start_server(self._handle, sock=self._sock)
        return self

    async def stop(self) -> None:
        """Switched off: connections refused until start() again."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._sock.close()

    def _answer(self, request: bytes) -> bytes:
        self.status_requests += 1
        if self.silent:
            return b""
        if request == DLE_EOT_PRINTER:
            return bytes([0x16 | (0x08 if self.cover_open else 0)])  # bit 3 set: offline
        if self.paper_out:
            return bytes([0x72])  # near-end and end sensors both report no paper
        return bytes([0x1E if self.paper_low else 0x12])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        job = bytearray()
        try:
            while data := await reader.read(4096):
                job += data
                for request in (DLE_EOT_PRINTER, DLE_EOT_PAPER):
                    while request in job:
                        at = job.index(request)
                        del job[at:at + len(request)]
                        answer = self._answer(request)
                        if answer:
                            writer.write(answer)
                            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if job:
                self.jobs.append(bytes(job))
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
