"""The TCP side of the till protocol: one listening socket per address, shared by every till device on it, and
one ``TillConnection`` per connected till.

Tills connect to the gateway (not the other way round) and name themselves in HELLO; the listener hands the
connection to the ``till_tcp`` device whose ``till_id`` matches. So all tills in a store are configured alike
(gateway address + their own till number) and the gateway opens a single port.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

from storelink import safe_json
from storelink.drivers import till_protocol as tp
from storelink.system.logs import exception_summary, loggable_id

log = logging.getLogger(__name__)


class TillRejected(Exception):
    """The till answered a request with ERROR."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class TillConnection:
    """One connected till: serialised writes, and requests from the gateway matched to their replies by id."""

    _ids = itertools.count(1)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.host = str(peer[0]) if isinstance(peer, tuple) else ""
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._write_lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.closed = asyncio.Event()
        self.last_rx = asyncio.get_running_loop().time()

    async def send(self, message: dict[str, Any]) -> None:
        if self.closed.is_set():
            raise ConnectionError("till connection is closed")
        async with self._write_lock:
            self.writer.write(tp.encode(message))
            await self.writer.drain()

    async def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a request and return the till's OK reply; TillRejected on ERROR, TimeoutError when silent."""
        rid = f"g{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            async with asyncio.timeout(timeout):
                await self.send({**message, "id": rid})
                reply = await fut
        except TimeoutError:
            raise TimeoutError(f"till did not answer {message['type']} within {timeout:g} s") from None
        finally:
            self._pending.pop(rid, None)
        if reply.get("type") == "ERROR":
            raise TillRejected(str(reply.get("code") or "error"), tp.short(str(reply.get("error") or "")))
        return reply

    def resolve(self, reply: dict[str, Any]) -> bool:
        """Hand a reply to the request waiting for it; False for a reply nobody waits for (late, unknown)."""
        fut = self._pending.get(str(reply.get("re")))
        if fut is None or fut.done():
            return False
        fut.set_result(reply)
        return True

    def close(self, why: str) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"till connection closed: {why}"))
        self._pending.clear()
        self.writer.close()


class TillEndpoint(Protocol):
    """What the listener needs from a till device (the till_tcp driver)."""

    device_id: str

    def admits(self, host: str) -> bool:
        """Whether a till connecting from ``host`` may be this device (its allow-list)."""
        ...

    async def attach(self, conn: TillConnection, hello: dict[str, Any]) -> None:
        """Serve this connection until it ends; raise ProtocolError to refuse it."""
        ...


class TillListener:
    """A listening socket shared by the till devices configured on one address (reference counted)."""

    _open: ClassVar[dict[tuple[str, int], TillListener]] = {}

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.routes: dict[str, TillEndpoint] = {}
        self.users = 0
        self.connections = 0  # open now
        self.unidentified = 0  # of those, still before their HELLO
        self.refused = 0
        self.server: asyncio.Server | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def acquire(cls, host: str, port: int) -> TillListener:
        """The listener on host:port, opened by the first device that needs it. OSError when it cannot bind."""
        key = (host, port)
        listener = cls._open.get(key)
        if listener is None:
            listener = cls._open[key] = cls(host, port)
            try:
                listener.server = await asyncio.start_server(listener._on_connect, host, port, limit=tp.MAX_LINE,
                                                             reuse_address=True)
            except OSError as err:
                del cls._open[key]
                listener.ready.set_exception(err)
                listener.ready.exception()  # retrieved: nobody else may be waiting
                raise OSError(err.errno, f"cannot listen for tills on {host}:{port}: {err.strerror}") from None
            listener.ready.set_result(None)
            log.info("listening for tills on %s:%d", host, port)
        await asyncio.shield(listener.ready)
        listener.users += 1
        return listener

    def register(self, till_id: str, endpoint: TillEndpoint) -> None:
        other = self.routes.get(till_id)
        if other is not None and other is not endpoint:
            raise ValueError(f"till_id {till_id!r} on {self.host}:{self.port} is already device {other.device_id!r}")
        self.routes[till_id] = endpoint

    def unregister(self, till_id: str, endpoint: TillEndpoint) -> None:
        if self.routes.get(till_id) is endpoint:
            del self.routes[till_id]

    async def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        self._open.pop((self.host, self.port), None)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            log.info("stopped listening for tills on %s:%d", self.host, self.port)

    def _admission(self, conn: TillConnection) -> tp.ProtocolError | None:
        """Why this connection is refused before a byte of it is read, or None: a peer no configured till may
        connect from, or more connections than the port serves (bounded, and fewer still before HELLO)."""
        if not any(endpoint.admits(conn.host) for endpoint in self.routes.values()):
            return tp.ProtocolError(tp.UNAUTHORIZED, "no till may connect from this address",
                                    log_detail="address not in any allow")
        if self.connections >= tp.MAX_CONNECTIONS or self.unidentified >= tp.MAX_UNIDENTIFIED:
            return tp.ProtocolError(tp.BUSY, "too many connections to this till port; try again later",
                                    log_detail="connection limit")
        return None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # A till that loses power leaves a half-open connection; keepalive (and our PINGs) find it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn = TillConnection(reader, writer)
        refusal = self._admission(conn)
        if refusal is not None:
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # 1st, 2nd, 4th...: a flood is not a log flood
                log.warning("till connection from %s refused: %s (%d refused so far)", conn.peer, refusal.loggable,
                            self.refused)
            await _reply_error(conn.send, None, refusal)
            conn.close("refused")
            return
        self.connections += 1
        self.unidentified += 1
        identified = False
        try:
            endpoint, hello = await self._hello(conn)
            self.unidentified -= 1
            identified = True
            if endpoint is not None:
                await endpoint.attach(conn, hello)
        except tp.ProtocolError as err:
            log.warning("till connection from %s refused: %s", conn.peer, err.loggable)
            await _reply_error(conn.send, err.re, err)
        except (ConnectionError, TimeoutError) as err:
            log.info("till connection from %s ended: %s", conn.peer, type(err).__name__)
        except Exception as err:
            log.error("till connection from %s failed: %s", conn.peer, exception_summary(err))
        finally:
            self.connections -= 1
            if not identified:
                self.unidentified -= 1
            conn.close("connection ended")

    async def _hello(self, conn: TillConnection) -> tuple[TillEndpoint | None, dict[str, Any]]:
        try:
            async with asyncio.timeout(tp.HELLO_TIMEOUT):
                line = await tp.read_line(conn.reader)
        except TimeoutError:
            raise tp.ProtocolError(tp.NOT_HELLO, f"no HELLO within {tp.HELLO_TIMEOUT:g} s",
                                   log_detail="no HELLO in time") from None
        if line is None:
            return None, {}
        hello = tp.decode(line)
        rid = hello.get("id")
        if hello["type"] != "HELLO":
            got = safe_json.echo(hello["type"], 24)
            raise tp.ProtocolError(tp.NOT_HELLO, f"the first message must be HELLO, got {got}", rid,
                                   log_detail="not HELLO")
        till_id = hello.get("till_id")
        if not isinstance(till_id, str) or not till_id:
            raise tp.ProtocolError(tp.BAD_REQUEST, "HELLO needs a non-empty string 'till_id'", rid,
                                   log_detail="no till_id")
        endpoint = self.routes.get(till_id)
        if endpoint is None:
            raise tp.ProtocolError(tp.UNKNOWN_TILL, f"no till {safe_json.echo(till_id)} is configured here", rid,
                                   log_detail=f"till_id {loggable_id(till_id)}")
        return endpoint, hello


async def _reply_error(send: Callable[[dict[str, Any]], Awaitable[None]], re: Any, err: tp.ProtocolError) -> None:
    try:
        await send({"type": "ERROR", "re": re, "code": err.code, "error": str(err)})
    except (ConnectionError, OSError):
        pass
