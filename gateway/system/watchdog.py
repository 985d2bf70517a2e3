"""A health-gated systemd watchdog: ``WATCHDOG=1`` is sent only while the gateway is really making progress.

A ping from a timer alone proves only that the event loop runs. The parts that matter (the uplink task, the
outbox writer, driver threads) each get a ``beat()`` function from :meth:`ProgressWatchdog.register` and call it
whenever they complete a round of work, *including idle rounds* (a read that timed out, a wait that woke up with
nothing to do): silence means stuck, not idle. When any part has been silent longer than its ``max_silence``, or
the loop is wedged (then this coroutine cannot run at all), the pings stop and systemd restarts the service after
``WatchdogSec=``; the hardware watchdog covers systemd itself.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from storelink.system import sdnotify

log = logging.getLogger(__name__)


@dataclass
class _Part:
    max_silence: float
    last_beat: float
    stalled: bool = False
    # For parts that already record their own progress time (``outbox.last_progress``): read, not pushed.
    probe: Callable[[], float] | None = None


class ProgressWatchdog:
    """Collects progress beats and pings systemd only when all registered parts are alive.

    ``interval`` defaults to what systemd passed (``WATCHDOG_USEC``); ``clock`` and ``notifier`` are injectable
    for tests. ``beat()`` functions are safe to call from any thread.
    """

    def __init__(
        self,
        interval: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        notifier: Callable[[str], bool] = sdnotify.notify,
    ) -> None:
        self.interval = interval if interval is not None else sdnotify.watchdog_interval()
        self._clock = clock
        self._notify = notifier
        self._lock = threading.Lock()
        self._parts: dict[str, _Part] = {}
        self._loop_stalled = False
        self.pings_sent = 0

    def register(self, name: str, max_silence: float) -> Callable[[], None]:
        """Start watching ``name``; it must call the returned ``beat()`` at least every ``max_silence`` s.

        The registration itself counts as a beat, so a part has ``max_silence`` to get going.
        """
        if max_silence <= 0:
            raise ValueError("max_silence must be positive")
        with self._lock:
            if name in self._parts:
                raise ValueError(f"watchdog part {name!r} is already registered")
            part = _Part(max_silence=max_silence, last_beat=self._clock())
            self._parts[name] = part
        clock, lock = self._clock, self._lock

        def beat() -> None:
            now = clock()
            with lock:
                part.last_beat = now

        return beat

    def watch(self, name: str, max_silence: float, last_progress: Callable[[], float]) -> None:
        """Like :meth:`register`, for a part that keeps its own progress timestamp.

        ``last_progress()`` returns when the part last made progress, on the watchdog's clock
        (``time.monotonic`` by default), e.g. ``wd.watch("outbox", 30, lambda: outbox.last_progress)``.
        It is called from the event loop every round, so it must only read a value.
        """
        self.register(name, max_silence)
        with self._lock:
            self._parts[name].probe = last_progress

    def unregister(self, name: str) -> None:
        """Stop watching a part that ended on purpose (a driver removed by a config change)."""
        with self._lock:
            self._parts.pop(name, None)

    def stalled_parts(self) -> list[tuple[str, float]]:
        """(name, seconds silent) for every part past its ``max_silence``, logging each new stall once."""
        now = self._clock()
        stalled: list[tuple[str, float]] = []
        with self._lock:
            parts = list(self._parts.items())
        snapshot = []
        for name, part in parts:
            last = part.last_beat
            if part.probe is not None:
                try:
                    last = max(last, part.probe())
                except Exception:  # a broken probe is a part we cannot vouch for: treat it as silent
                    log.exception("watchdog: reading the progress of %s failed", name)
            snapshot.append((name, part, now - last))
        for name, part, silent in snapshot:
            if silent > part.max_silence:
                stalled.append((name, silent))
                if not part.stalled:
                    part.stalled = True
                    log.error(
                        "watchdog: %s made no progress for %.1f s (limit %.1f s); withholding WATCHDOG=1 "
                        "so systemd restarts the gateway",
                        name,
                        silent,
                        part.max_silence,
                        extra={"watchdog_part": name},
                    )
            elif part.stalled:
                part.stalled = False
                log.warning("watchdog: %s is making progress again", name, extra={"watchdog_part": name})
        return stalled

    def check_and_ping(self, loop_lag: float = 0.0) -> bool:
        """One watchdog round: ping if everything is healthy. Returns whether a ping was sent.

        ``loop_lag`` is how late the caller's timer fired. A lag of half the interval means the loop was
        blocked long enough that systemd may already be about to act: that is an unresponsive loop, and we do
        not paper over it with a ping that merely happened to get through afterwards.
        """
        stalled = self.stalled_parts()
        loop_ok = self.interval is None or loop_lag < self.interval / 2
        if not loop_ok and not self._loop_stalled:
            log.error("watchdog: event loop was blocked for %.1f s; withholding WATCHDOG=1", loop_lag)
        elif loop_ok and self._loop_stalled:
            log.warning("watchdog: event loop is responsive again")
        self._loop_stalled = not loop_ok
        if stalled or not loop_ok:
            names = ", ".join(name for name, _ in stalled) or "event loop"
            self._notify(sdnotify.status_line(f"stalled: {names}"))
            return False
        if self._notify("WATCHDOG=1"):
            self.pings_sent += 1
            return True
        return False

    async def run(self) -> None:
        """Ping every ``interval / 2`` while healthy. Returns at once when systemd's watchdog is off."""
        if self.interval is None:
            return
        # systemd's default WatchdogSignal is SIGABRT: have Python dump every thread's stack to stderr (the
        # journal) first, so a stall in the field leaves a trace of where it was stuck.
        if not faulthandler.is_enabled():
            faulthandler.enable(file=sys.stderr, all_threads=True)
        period = self.interval / 2
        loop = asyncio.get_running_loop()
        self.check_and_ping()
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            self.check_and_ping(loop_lag=max(0.0, loop.time() - due))

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: call once config is loaded, the database open and HTTP listening."""
        return self._notify("READY=1" + ("\n" + sdnotify.status_line(status) if status else ""))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: call when shutdown begins."""
        return self._notify("STOPPING=1" + ("\n" + sdnotify.status_line(status) if status else ""))

    def status(self, text: str) -> bool:
        """One-line status for ``systemctl status``."""
        return self._notify(sdnotify.status_line(text))
