"""A driver stops when it is cancelled, even when the cancel lands just as the thing it waits for happens.

On Python 3.11 (Debian bookworm's, the appliance's) `asyncio.wait_for` swallows a cancellation that arrives in the
same loop iteration as the inner wait completing: the caller's loop goes on, and whoever awaits the cancelled task
(the supervisor restarting a device, the gateway stopping) waits forever. That is how a test run stalled for
minutes around tests/test_zpl_printer.py; pytest-timeout's task dump (conftest.py) showed the ZPL driver
"cancelling" but back in its idle pause. The code uses `asyncio.timeout()`, which tells its own timeout from a
cancel; the checks below keep it that way.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from storelink.drivers.base import Health
from storelink.drivers.sim.zpl_printer import FakeZplPrinter
from tests.label_harness import until
from tests.test_zpl_printer import make_driver

ROOT = Path(__file__).resolve().parent.parent


async def test_a_cancel_as_the_printer_loop_is_woken_stops_the_driver(tmp_path: Path) -> None:
    printer = await FakeZplPrinter().start()
    try:
        for _ in range(5):
            driver, ctx = make_driver(tmp_path, printer.port, poll_interval=30)
            task = asyncio.create_task(driver.run())
            await until(lambda ctx=ctx: ctx.state == Health.OK, what="printer ok")  # type: ignore[misc]
            await asyncio.sleep(0.05)  # idle in its pause, waiting to be woken
            driver._wake.set()  # what price_prepare does when labels are queued ...
            task.cancel()  # ... in the same loop iteration as the supervisor stopping the device
            done, _ = await asyncio.wait([task], timeout=5)
            assert done, "the driver swallowed its cancellation and kept running"
            assert task.cancelled()
    finally:
        await printer.stop()


def test_no_asyncio_wait_for_in_the_gateway_or_drivers() -> None:
    users = [f"{p.relative_to(ROOT)}:{n}" for folder in ("gateway", "drivers") for p in (ROOT / folder).rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\basyncio\.wait_for\(", line)]
    assert not users, f"use `async with asyncio.timeout(...)` (3.11's wait_for can swallow a cancel): {users}"
