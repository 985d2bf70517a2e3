"""Label jobs survive kill -9 of the process that queued them: a real subprocess runs the driver and is killed,
a new driver on the same queue file finishes the job (at-least-once, shown honestly)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from storelink.drivers.sim.zpl_printer import FakeZplPrinter
from tests.label_harness import until, until_async
from tests.test_zpl_printer import make_driver, running

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import asyncio, sys
from pathlib import Path
from tests.test_zpl_printer import ITEMS, make_driver
from tests.label_harness import Change

async def main():
    driver, _ = make_driver(Path(sys.argv[1]), int(sys.argv[2]))
    task = asyncio.create_task(driver.run())
    await driver.price_prepare(Change(1, ITEMS))
    print("PREPARED", flush=True)
    await task

asyncio.run(main())
"""


async def start_child(tmp_path: Path, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path), str(port), stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.strip() == b"PREPARED", line
    return proc


async def kill9(proc: asyncio.subprocess.Process) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL


async def test_queued_labels_survive_kill9_and_print_once(tmp_path: Path) -> None:
    printer = FakeZplPrinter()  # bound but not listening: connections refused while the child runs
    printer._sock.close()
    child = await start_child(tmp_path, printer.port)
    await kill9(child)
    await printer.start()
    try:
        driver, _ = make_driver(tmp_path, printer.port)
        async with running(driver):
            await until_async(lambda: driver.price_confirmed(1), what="printed after restart")
            await asyncio.sleep(0.3)
    finally:
        await printer.stop()
    assert [f[-1] for f in printer.core.printed_fields()] == ["1001  v1", "1002  v1", "1003  v1"]


async def test_labels_written_but_unconfirmed_at_kill9_are_printed_again(tmp_path: Path) -> None:
    printer = await FakeZplPrinter().start()
    printer.core.print_seconds = 60  # the first label is still printing when the gateway dies
    try:
        child = await start_child(tmp_path, printer.port)
        await until(lambda: len(printer.core.pending) == 3, what="batch written")
        await kill9(child)
        printer.core.hurry()
        driver, ctx = make_driver(tmp_path, printer.port)
        async with running(driver):
            await until_async(lambda: driver.price_confirmed(1), what="confirmed after restart")
    finally:
        await printer.stop()
    # the printer kept the formats it had, and the restarted driver could not know: every label came out twice
    skus = [f[-1] for f in printer.core.printed_fields()]
    assert sorted(skus) == sorted(["1001  v1", "1002  v1", "1003  v1"] * 2)
    assert ("label", {"event": "printed", "labels": 3, "versions": [1], "restored": 0}) in ctx.events
