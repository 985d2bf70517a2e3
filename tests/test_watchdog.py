"""The health-gated watchdog: pings stop when a part or the event loop is wedged, and resume after."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from storelink.system.watchdog import ProgressWatchdog
from tests.systemd_helpers import NotifyListener, longest_gap

INTERVAL = 0.4  # as if WatchdogSec=400ms: pings every 0.2 s


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pings_only_while_every_part_beats(caplog: pytest.LogCaptureFixture) -> None:
    clock, sent = FakeClock(), []
    wd = ProgressWatchdog(10.0, clock=clock, notifier=lambda m: sent.append(m) is None)
    beat_uplink = wd.register("uplink", 30)
    beat_outbox = wd.register("outbox", 5)

    assert wd.check_and_ping()
    clock.now += 4
    beat_uplink()
    assert wd.check_and_ping()

    clock.now += 2  # outbox silent for 6 s > 5 s
    with caplog.at_level(logging.ERROR, logger="storelink.system.watchdog"):
        assert not wd.check_and_ping()
        clock.now += 1
        assert not wd.check_and_ping()
    stall_logs = [r for r in caplog.records if "outbox made no progress" in r.getMessage()]
    assert len(stall_logs) == 1, "a stall is logged once, not every round"
    assert "uplink" not in stall_logs[0].getMessage()
    assert sent[-1] == "STATUS=stalled: outbox"

    beat_outbox()
    assert wd.check_and_ping()
    assert sent[-1] == "WATCHDOG=1"
    assert wd.pings_sent == 3
    assert any("outbox is making progress again" in r.getMessage() for r in caplog.records)


def test_registration_counts_as_first_beat_and_names_are_unique() -> None:
    clock = FakeClock()
    wd = ProgressWatchdog(10.0, clock=clock, notifier=lambda _m: True)
    clock.now += 100
    wd.register("late-starter", 3)
    assert wd.check_and_ping()
    with pytest.raises(ValueError):
        wd.register("late-starter", 3)
    with pytest.raises(ValueError):
        wd.register("zero", 0)
    clock.now += 4
    assert not wd.check_and_ping()
    wd.unregister("late-starter")
    assert wd.check_and_ping()


def test_watch_reads_a_parts_own_progress_timestamp() -> None:
    clock = FakeClock()

    class Outbox:
        last_progress = clock.now

    outbox = Outbox()
    wd = ProgressWatchdog(10.0, clock=clock, notifier=lambda _m: True)
    wd.watch("outbox", 5, lambda: outbox.last_progress)
    clock.now += 4
    assert wd.check_and_ping()
    clock.now += 2
    assert not wd.check_and_ping(), "6 s since the outbox last made progress"
    outbox.last_progress = clock.now
    assert wd.check_and_ping()

    def broken() -> float:
        raise RuntimeError("probe failed")

    wd.watch("broken", 5, broken)
    assert wd.check_and_ping(), "registration still counts as the first beat"
    clock.now += 6
    outbox.last_progress = clock.now
    assert not wd.check_and_ping()


def test_a_late_timer_means_an_unresponsive_loop() -> None:
    wd = ProgressWatchdog(10.0, clock=FakeClock(), notifier=lambda _m: True)
    assert wd.check_and_ping(loop_lag=1.0)
    assert not wd.check_and_ping(loop_lag=6.0)
    assert wd.check_and_ping(loop_lag=0.0)


async def test_run_returns_when_watchdog_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    wd = ProgressWatchdog()
    assert wd.interval is None
    await asyncio.wait_for(wd.run(), 1)


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    lst = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", lst.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(int(INTERVAL * 1_000_000)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield lst
    lst.close()


@contextlib.asynccontextmanager
async def running(wd: ProgressWatchdog) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(wd.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_wedged_task_stops_the_pings(listener: NotifyListener) -> None:
    wd = ProgressWatchdog()
    assert wd.interval == INTERVAL
    beat = wd.register("outbox", max_silence=0.3)
    healthy = asyncio.Event()
    healthy.set()

    async def outbox_writer() -> None:
        while True:
            await healthy.wait()  # wedged while cleared: no more rounds of work
            beat()
            await asyncio.sleep(0.02)

    worker = asyncio.create_task(outbox_writer())
    async with running(wd):
        await asyncio.sleep(1.0)
        healthy_pings = len(listener.times_of("WATCHDOG=1"))
        assert healthy_pings >= 4, listener.texts()

        wedged_at = time.monotonic()
        healthy.clear()
        await asyncio.sleep(1.5)
        unwedged_at = time.monotonic()
        healthy.set()
        await asyncio.sleep(1.0)
    worker.cancel()

    pings = listener.times_of("WATCHDOG=1")
    # The last ping may come up to max_silence after the wedge; after that, nothing for far longer than
    # WatchdogSec, which is what makes systemd restart the service.
    assert not [t for t in pings if wedged_at + 0.3 + INTERVAL / 2 < t < unwedged_at]
    assert longest_gap(pings, wedged_at, unwedged_at) > 2 * INTERVAL
    assert any("STATUS=stalled: outbox" in m for m in listener.texts())
    after = [t for t in pings if t > unwedged_at]
    assert len(after) >= 3, "pings resume once the part makes progress again"


async def test_blocked_event_loop_stops_the_pings(listener: NotifyListener) -> None:
    wd = ProgressWatchdog()
    wd.register("loop-only", max_silence=60)
    async with running(wd):
        await asyncio.sleep(0.8)
        blocked_at = time.monotonic()
        time.sleep(1.2)  # noqa: ASYNC251 -- on purpose: blocking I/O in a coroutine wedges the loop
        released_at = time.monotonic()
        await asyncio.sleep(0.8)
    pings = listener.times_of("WATCHDOG=1")
    assert [t for t in pings if t < blocked_at], "pinged before the block"
    assert not [t for t in pings if blocked_at < t < released_at]
    assert [t for t in pings if t > released_at + INTERVAL], "pinged again once the loop ran freely"


async def test_hung_driver_thread_stops_the_pings(listener: NotifyListener) -> None:
    wd = ProgressWatchdog()
    beat = wd.register("driver:scanner0", max_silence=0.3)
    hang, stop = threading.Event(), threading.Event()

    def driver() -> None:
        while not stop.is_set():
            if hang.is_set():
                stop.wait()  # e.g. a read() on a device that never returns
            beat()
            time.sleep(0.02)

    thread = threading.Thread(target=driver, daemon=True)
    thread.start()
    try:
        async with running(wd):
            await asyncio.sleep(0.8)
            assert listener.times_of("WATCHDOG=1")
            hung_at = time.monotonic()
            hang.set()
            await asyncio.sleep(1.5)
    finally:
        stop.set()
        thread.join(2)
    pings = listener.times_of("WATCHDOG=1")
    assert not [t for t in pings if t > hung_at + 0.3 + INTERVAL / 2]
    assert any("STATUS=stalled: driver:scanner0" in m for m in listener.texts())


async def test_ready_status_stopping_helpers(listener: NotifyListener) -> None:
    wd = ProgressWatchdog()
    assert wd.ready("gateway up")
    assert wd.status("uplink connected")
    assert wd.stopping()
    listener.wait_count("STOPPING=1", 1, timeout=2)
    assert listener.texts() == ["READY=1\nSTATUS=gateway up", "STATUS=uplink connected", "STOPPING=1"]
