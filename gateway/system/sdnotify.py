"""systemd's sd_notify protocol with the standard library only.

A notification is one datagram of ``KEY=value`` lines sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for Linux's abstract namespace). We avoid python-systemd so the appliance venv needs no
C build against libsystemd, and so the same code runs (and is silently a no-op) outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _socket_address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr[0] == "@":
        # Abstract namespace: the kernel wants a leading NUL instead of the '@' systemd writes.
        return "\0" + addr[1:]
    if addr[0] == "/":
        return addr
    # "vsock:CID:PORT" (systemd >= 253, for VMs) is not something an appliance on a Pi is handed.
    log.debug("NOTIFY_SOCKET=%r is not a unix socket address; notifications disabled", addr)
    return None


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"`` or ``"WATCHDOG=1\\nSTATUS=ok"``) to systemd.

    Returns False when not run under a notify-aware service manager or when the datagram could not be sent.
    Never raises and never blocks: a full socket queue means systemd is not reading, and the caller (often the
    watchdog loop) must not hang on that.
    """
    addr = _socket_address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(addr)
            sent = sock.send(message.encode("utf-8"))
    except OSError as err:
        log.debug("sd_notify %r to %r failed: %s", message, addr, err)
        return False
    return sent > 0


def watchdog_interval() -> float | None:
    """The watchdog timeout systemd expects pings within (``WatchdogSec=``), in seconds, or None.

    None when the watchdog is off, or when ``$WATCHDOG_PID`` names another process (the variables were
    inherited by a child and are not meant for it). Ping at half this interval.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return value / 1_000_000


def status_line(text: str) -> str:
    """``STATUS=text`` as one line."""
    # STATUS is one line in the protocol; a newline would start a new (bogus) assignment.
    return "STATUS=" + " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Tell systemd start-up is finished (``Type=notify`` units stay "activating" until this)."""
    return notify("READY=1" + ("\n" + status_line(status) if status else ""))


def stopping(status: str | None = None) -> bool:
    """Tell systemd we began shutting down, so a slow stop is not mistaken for a hang."""
    return notify("STOPPING=1" + ("\n" + status_line(status) if status else ""))


def status(text: str) -> bool:
    """Free-form one-line status shown by ``systemctl status storelink``."""
    return notify(status_line(text))
