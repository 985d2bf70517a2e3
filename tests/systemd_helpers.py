"""Plays systemd's side of the notify protocol in tests: a real AF_UNIX datagram socket and a reader thread."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path


class NotifyListener:
    """Binds ``address`` (a path, or ``@name`` for the abstract namespace) and records every datagram.

    Messages are stored with the monotonic time they arrived, from a thread, so that a test whose event loop
    is deliberately wedged still sees exactly when pings stopped.
    """

    def __init__(self, address: str | Path) -> None:
        self.address = str(address)
        bind_to = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(bind_to)
        self._sock.settimeout(0.05)
        self._lock = threading.Lock()
        self._messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def messages(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._messages)

    def texts(self) -> list[str]:
        return [m for _, m in self.messages]

    def times_of(self, line: str) -> list[float]:
        """Arrival times of messages containing ``line`` as one of their assignments."""
        return [t for t, m in self.messages if line in m.split("\n")]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; got {self.texts()!r}")

    def wait_count(self, line: str, count: int, timeout: float) -> None:
        self.wait_for(lambda: len(self.times_of(line)) >= count, timeout, f"{count} x {line}")


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch in [start, end] without any of ``times``."""
    points = [start, *sorted(t for t in times if start <= t <= end), end]
    return max(b - a for a, b in itertools.pairwise(points))


def env_with_notify(address: str, watchdog_usec: int | None, pid: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["NOTIFY_SOCKET"] = address
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    if pid is not None:
        env["WATCHDOG_PID"] = str(pid)
    return env
