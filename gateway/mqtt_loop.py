"""paho-mqtt's network I/O on the asyncio loop instead of paho's own thread (as Home Assistant's MQTT client does).

With ``loop_start()`` every PUBACK, message and connect result crosses from paho's thread to the loop
(``call_soon_threadsafe``), and every ``publish()`` from the loop wakes paho's thread through a socket pair: two
thread hand-offs and the GIL ping-pong that comes with them, per message. Here the loop watches paho's socket
itself: readable -> ``loop_read()``, writable while paho has packets queued -> ``loop_write()``, every second ->
``loop_misc()`` (keepalive pings, a broker that stopped answering). paho's callbacks therefore run on the loop,
inside those calls, and may touch the uplink's state directly.

Connecting blocks (DNS, the TCP handshake, the TLS handshake), so :meth:`LoopNetwork.connect` runs paho's
``reconnect()`` in a worker thread; the socket callbacks paho makes from there are handed to the loop. Reconnecting
after a loss is the owner's job (paho reconnects only inside its own loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

MISC_INTERVAL = 1.0  # seconds between loop_misc() calls; paho's own loop checks its keepalive as often


class LoopNetwork:
    """Drives one paho client's socket from ``loop``. ``after_read()`` runs after each batch of incoming packets
    (paho has called on_publish/on_message for them by then), so the owner can act once per burst."""

    def __init__(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop,
                 after_read: Callable[[], None] | None = None):
        self.client = client
        self._loop = loop
        self._loop_thread = threading.get_ident()  # built on the loop: this is the loop's thread
        self._after_read = after_read
        self._fd: int | None = None
        self._sock: Any = None
        self._writing = False
        self._misc: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()  # no socket: never connected yet, or the connection is gone
        self.closed.set()
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    async def connect(self) -> None:
        """Connect (or connect again) with the settings given to ``connect_async()``; returns once CONNECT is
        queued. Raises OSError (refused, unreachable, timed out, TLS handshake failed, name not found).

        Cancelled meanwhile, the thread still finishes; a connection it made is then closed again at once."""
        attempt = self._loop.run_in_executor(None, self.client.reconnect)
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(self._abandoned)
            raise

    def _abandoned(self, attempt: asyncio.Future[Any]) -> None:
        if not attempt.cancelled() and attempt.exception() is None:
            self.client.disconnect()

    def close(self) -> None:
        """Stop watching the socket (paho closes it itself on disconnect()) and the keepalive task."""
        self._unwatch()
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    # -- paho's socket callbacks (from the loop, or from the connect thread) ----------------------------------
    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to watch any more
                self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock)

    def _on_socket_close(self, _client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        self._on_loop(self._unwatch)  # paho closes the socket right after: on the loop this runs first

    def _on_register_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock)

    def _on_unregister_write(self, _client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        self._on_loop(self._no_write)

    # -- on the loop ------------------------------------------------------------------------------------------
    def _watch(self, sock: Any) -> None:
        fd = sock.fileno()
        if fd < 0:
            return  # closed again before the loop got here
        self._forget()
        self._fd, self._sock = fd, sock
        self._loop.add_reader(fd, self._readable)
        self.closed.clear()
        if self.client.want_write():
            self._want_write(sock)
        if self._misc is None or self._misc.done():
            self._misc = self._loop.create_task(self._misc_loop(), name="mqtt-keepalive")

    def _unwatch(self) -> None:
        self._forget()
        self.closed.set()

    def _forget(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._fd, self._sock, self._writing = None, None, False

    def _want_write(self, sock: Any) -> None:
        if self._fd is not None and not self._writing and sock is self._sock:
            self._writing = True
            self._loop.add_writer(self._fd, self.client.loop_write)

    def _no_write(self) -> None:
        if self._fd is not None and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _readable(self) -> None:
        sock = self._sock
        self.client.loop_read()
        # A TLS record can hold more packets than loop_read() took; they wait in the SSL object, where epoll
        # cannot see them (paho's own loop checks pending() for the same reason).
        while self._sock is sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
            self.client.loop_read()
        if self._after_read is not None:
            self._after_read()

    async def _misc_loop(self) -> None:
        while self._fd is not None:  # started again by the next connection's _watch()
            await asyncio.sleep(MISC_INTERVAL)
            self.client.loop_misc()
