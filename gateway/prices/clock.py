"""Is the store's clock synchronised? A scheduled price change switches the tills at ``effective_at`` by this
clock, so a store that cannot say yes refuses to schedule (docs/prices.md).

The kernel knows: every NTP client (chrony, ntpd, systemd-timesyncd) disciplines the clock through adjtimex(2),
which returns ``TIME_ERROR`` while the clock is marked unsynchronised (``STA_UNSYNC``, set at boot and again when
the client loses its servers). That is what ``timedatectl show -p NTPSynchronized`` reports too, but it works
without systemd and without D-Bus. A read-only call (``modes`` = 0) needs no privileges.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Literal

from storelink.contract import ClockReport

TIME_ERROR = 5  # adjtimex's clock state "not synchronised"
_TIMEX_SIZE = 512  # struct timex is 208 bytes on 64-bit Linux; a larger zeroed buffer leaves room for any ABI


def _report(synchronised: bool | None, source: Literal["adjtimex", "config"], detail: str) -> ClockReport:
    return ClockReport(synchronised=synchronised, source=source, detail=detail, checked_at=time.time())


def kernel_clock_state() -> ClockReport:
    """Ask the kernel (adjtimex with modes = 0: read only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buf = ctypes.create_string_buffer(_TIMEX_SIZE)  # modes (the first field) = 0: change nothing
        state = int(libc.adjtimex(buf))
    except (OSError, AttributeError) as err:
        return _report(None, "adjtimex", f"adjtimex unavailable: {err}")
    if state < 0:
        return _report(None, "adjtimex", f"adjtimex failed: errno {ctypes.get_errno()}")
    if state == TIME_ERROR:
        return _report(False, "adjtimex", "the kernel marks the clock unsynchronised (no NTP sync)")
    return _report(True, "adjtimex", f"synchronised (clock state {state})")


def clock_state(setting: Literal["auto"] | bool) -> ClockReport:
    """`[prices] clock_synchronised`: "auto" asks the kernel; true/false is taken as said (tests, or a store with
    another time reference)."""
    if setting == "auto":
        return kernel_clock_state()
    return _report(bool(setting), "config", "[prices] clock_synchronised = " + str(setting).lower())
