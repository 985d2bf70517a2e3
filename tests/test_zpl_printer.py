"""zpl_printer against a fake Zebra printer on loopback (and on a pty): rendering, ~HS, faults, the durable
queue, and the price-target phases."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storelink.drivers.base import Health
from storelink.drivers.sim.zpl_printer import FakeZplCore, FakeZplPrinter
from storelink.drivers.zpl_label import (
    HostStatusError,
    LabelLayout,
    host_status_answer,
    parse_host_status,
    render_label,
)
from storelink.drivers.zpl_printer import ZplPrinter, ZplPrinterConfig
from tests.label_harness import Change, Item, RecordingContext, until, until_async

ITEMS = [
    Item("1001", "4006381333931", 199, "Organic whole milk 1 l", 199, "l"),
    Item("1002", "036000291452", 349, "Peanut butter ^~ crunchy", 1396, "kg"),
    Item("1003", None, 99, "Loose bread roll"),
]


def make_driver(tmp_path: Path, port: int, **extra: object) -> tuple[ZplPrinter, RecordingContext]:
    cfg = ZplPrinterConfig.model_validate({
        "id": "labels-1", "driver": "zpl_printer", "host": "127.0.0.1", "port": port, "status_timeout": 0.5,
        "poll_interval": 0.3, "retry_interval": 0.1, "confirm_interval": 0.05, **extra,
    })
    ctx = RecordingContext(tmp_path, "labels-1")
    return ZplPrinter(cfg, ctx), ctx


@contextlib.asynccontextmanager
async def running(driver: ZplPrinter) -> AsyncIterator[ZplPrinter]:
    task = asyncio.create_task(driver.run())
    try:
        yield driver
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def printer() -> AsyncIterator[FakeZplPrinter]:
    p = await FakeZplPrinter().start()
    yield p
    await p.stop()


# -- rendering and ~HS ----------------------------------------------------------------------------------------


def test_label_has_name_price_unit_price_barcode_and_version() -> None:
    zpl, problems = render_label(ITEMS[0], "EUR", 7, LabelLayout())
    text = zpl.decode()
    assert problems == []
    assert text.startswith("^XA\n^CI28\n^PW464\n^LL304\n") and text.rstrip().endswith("^XZ")
    assert "^FDOrganic whole milk 1 l^FS" in text
    assert "^FD€1.99^FS" in text and "^FD€1.99 / l^FS" in text
    assert "^BEN," in text and "^FD400638133393^FS" in text  # 12 digits: the printer adds the check digit
    assert "^FD1001  v7^FS" in text
    upc, _ = render_label(ITEMS[1], "USD", 7, LabelLayout(dpi=300, width_mm=50, height_mm=30))
    assert b"^BUN," in upc and b"^FD03600029145^FS" in upc and b"^PW591" in upc


def test_label_escapes_zpl_control_characters_and_rejects_a_bad_check_digit() -> None:
    zpl, problems = render_label(Item("9", "4006381333932", 5, "A^XZ~JR_x\x00"), "EUR", 1, LabelLayout())
    assert b"^FDA_5EXZ_7EJR_5Fx^FS" in zpl  # ^ ~ _ hex-escaped under ^FH_, NUL dropped
    assert zpl.count(b"^XZ") == 1 and b"~JR" not in zpl
    assert b"^BE" not in zpl and len(problems) == 1 and "check digit" in problems[0]


def test_host_status_parsing() -> None:
    # The shape from the ZPL II programming guide (a healthy idle printer).
    sample = (b"\x02030,0,0,0304,000,0,0,0,000,0,0,0\x03\r\n"
              b"\x02001,0,0,0,1,2,6,0,00000000,1,000\x03\r\n\x021234,0\x03\r\n")
    st = parse_host_status(sample)
    assert st.healthy and st.idle
    core = FakeZplCore()
    core.paper_out = core.head_open = True
    st = parse_host_status(host_status_answer(core.status()))
    assert st.problems() == ["paper out", "head open"] and not st.healthy
    with pytest.raises(HostStatusError):
        parse_host_status(b"\x02030,0,0\x03")
    with pytest.raises(HostStatusError):
        parse_host_status(sample.replace(b"00000000", b"0000000x"))


# -- printing ---------------------------------------------------------------------------------------------------


async def test_prints_each_label_once_and_confirms(tmp_path: Path, printer: FakeZplPrinter) -> None:
    printer.core.print_seconds = 0.05
    driver, ctx = make_driver(tmp_path, printer.port)
    async with running(driver):
        await until(lambda: ctx.state == Health.OK, what="printer ok")
        await driver.price_prepare(Change(1, ITEMS))
        await driver.price_prepare(Change(1, ITEMS))  # the coordinator may repeat itself after a crash
        await until_async(lambda: driver.price_confirmed(1), what="version 1 confirmed")
        await asyncio.sleep(0.5)  # a few more polls: nothing is printed twice
    assert len(printer.core.printed) == 3
    assert [f[-1] for f in printer.core.printed_fields()] == ["1001  v1", "1002  v1", "1003  v1"]
    assert (tmp_path / "zpl-labels-1.db").exists()  # beside the gateway's database
    assert await driver.price_reported_version() == 1
    assert ("label", {"event": "printed", "labels": 3, "versions": [1], "restored": 0}) in ctx.events


async def test_paper_out_degrades_and_holds_labels_until_fixed(tmp_path: Path, printer: FakeZplPrinter) -> None:
    driver, ctx = make_driver(tmp_path, printer.port)
    printer.core.paper_out = True
    async with running(driver):
        await until(lambda: ctx.state == Health.DEGRADED, what="degraded")
        assert ctx.error == "paper out"
        await driver.price_prepare(Change(1, ITEMS[:2]))
        await asyncio.sleep(0.5)
        assert not await driver.price_confirmed(1) and printer.core.printed == []
        printer.core.paper_out = False
        await until_async(lambda: driver.price_confirmed(1), what="confirmed after paper loaded")
    assert len(printer.core.printed) == 2 and ctx.state == Health.OK


async def test_head_open_while_printing_keeps_jobs_unconfirmed(tmp_path: Path, printer: FakeZplPrinter) -> None:
    driver, ctx = make_driver(tmp_path, printer.port)
    async with running(driver):
        await until(lambda: ctx.state == Health.OK)
        printer.core.print_seconds = 0.5
        await driver.price_prepare(Change(1, ITEMS))
        await until(lambda: len(printer.core.pending) == 3, what="formats received")
        printer.core.head_open = True  # opened mid-batch: the printer keeps what it has not printed
        await until(lambda: ctx.error == "head open", what="head open reported")
        await asyncio.sleep(0.6)
        assert not await driver.price_confirmed(1) and printer.core.pending
        printer.core.head_open = False
        await until_async(lambda: driver.price_confirmed(1))
    assert len(printer.core.printed) == 3  # held formats printed by the printer, not sent twice


async def test_silent_printer_is_offline_and_the_job_waits(tmp_path: Path, printer: FakeZplPrinter) -> None:
    printer.core.silent = True
    driver, ctx = make_driver(tmp_path, printer.port)
    async with running(driver):
        await driver.price_prepare(Change(1, ITEMS[:1]))
        await until(lambda: ctx.state == Health.OFFLINE and "silent" in (ctx.error or ""), what="offline")
        await asyncio.sleep(0.5)
        assert not await driver.price_confirmed(1)
        printer.core.silent = False
        await until_async(lambda: driver.price_confirmed(1), what="confirmed once the printer answers")
    assert len(printer.core.printed) == 1 and printer.core.dropped == [] and ctx.state == Health.OK


async def test_printer_dies_mid_batch_labels_are_sent_again(tmp_path: Path, printer: FakeZplPrinter) -> None:
    driver, ctx = make_driver(tmp_path, printer.port)
    async with running(driver):
        await until(lambda: ctx.state == Health.OK)
        printer.core.print_seconds = 0.4
        await driver.price_prepare(Change(1, ITEMS))
        await until(lambda: len(printer.core.pending) == 3, what="formats received")
        await asyncio.sleep(0.1)
        printed_before = len(printer.core.printed)
        lost = printer.core.power_cycle(silent=True)  # switched off: unprinted formats are gone, ~HS unanswered
        await until(lambda: ctx.state == Health.OFFLINE, what="offline")
        assert lost > 0 and not await driver.price_confirmed(1)
        printer.core.silent = False
        await until_async(lambda: driver.price_confirmed(1), what="confirmed after power comes back")
    # at-least-once: the whole unconfirmed batch is sent again, so a label already out comes out twice
    assert len(printer.core.printed) == printed_before + 3
    assert {f[-1] for f in printer.core.printed_fields()} == {"1001  v1", "1002  v1", "1003  v1"}


async def test_connection_refused_then_back(tmp_path: Path, printer: FakeZplPrinter) -> None:
    await printer.refuse()
    driver, ctx = make_driver(tmp_path, printer.port)
    async with running(driver):
        await until(lambda: ctx.state == Health.OFFLINE and "cannot connect" in (ctx.error or ""))
        await driver.price_prepare(Change(3, ITEMS))
        await asyncio.sleep(0.3)
        await printer.start()
        await until_async(lambda: driver.price_confirmed(3))
    assert len(printer.core.printed) == 3


async def test_abort_cancels_unsent_and_reprints_the_old_label(tmp_path: Path, printer: FakeZplPrinter) -> None:
    driver, ctx = make_driver(tmp_path, printer.port)
    async with running(driver):
        await driver.price_prepare(Change(1, ITEMS))
        await until_async(lambda: driver.price_confirmed(1))
        v1_milk = printer.core.printed[0]
        # v2 cannot be sent (printer off) and is aborted: nothing of v2 may ever print
        await printer.refuse()
        await driver.price_prepare(Change(2, [Item("1001", "4006381333931", 219, "Organic whole milk 1 l")]))
        await driver.price_abort(2)
        await driver.price_abort(2)  # idempotent
        await printer.start()
        # v3 prints, then is aborted: the v1 label for the same item is printed again
        await driver.price_prepare(Change(3, [Item("1001", "4006381333931", 149, "Organic whole milk 1 l")]))
        await until_async(lambda: driver.price_confirmed(3))
        await driver.price_abort(3)
        await until(lambda: len(printer.core.printed) == 5, what="old label reprinted")
        await asyncio.sleep(0.3)
    assert [f[-1] for f in printer.core.printed_fields()] == ["1001  v1", "1002  v1", "1003  v1", "1001  v3",
                                                               "1001  v1"]
    assert printer.core.printed[-1] == v1_milk
    assert not await driver.price_confirmed(2) and not await driver.price_confirmed(3)
    assert await driver.price_reported_version() == 1
    with pytest.raises(Exception, match="aborted"):
        await driver.price_prepare(Change(2, ITEMS[:1]))
    assert any(k == "label" and e.get("event") == "aborted" and e["cancelled"] == 1 for k, e in ctx.events)


async def test_queued_jobs_survive_a_restart_of_the_driver(tmp_path: Path, printer: FakeZplPrinter) -> None:
    await printer.refuse()
    driver, _ = make_driver(tmp_path, printer.port)
    async with running(driver):
        await driver.price_prepare(Change(5, ITEMS))
        await asyncio.sleep(0.2)
    again, _ = make_driver(tmp_path, printer.port)  # a new process would build a new driver on the same file
    await printer.start()
    async with running(again):
        await until_async(lambda: again.price_confirmed(5))
    assert len(printer.core.printed) == 3


async def test_serial_printer_on_a_pty(tmp_path: Path) -> None:
    master, slave = os.openpty()
    core = FakeZplCore()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not select.select([master], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            answer = core.feed(data)
            if answer:
                os.write(master, answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        driver, ctx = make_driver(tmp_path, 9100, connection="serial", host=None,
                                  serial_port=os.ttyname(slave), baudrate=115200)
        async with running(driver):
            await driver.price_prepare(Change(1, ITEMS[:2]))
            await until_async(lambda: driver.price_confirmed(1))
        assert len(core.printed) == 2 and ctx.state == Health.OK
    finally:
        stop.set()
        thread.join(2)
        os.close(slave)
        os.close(master)


def test_config_needs_an_endpoint() -> None:
    with pytest.raises(ValueError, match="host is required"):
        ZplPrinterConfig.model_validate({"id": "p", "driver": "zpl_printer"})
    with pytest.raises(ValueError, match="serial_port is required"):
        ZplPrinterConfig.model_validate({"id": "p", "driver": "zpl_printer", "connection": "serial"})
    with pytest.raises(ValueError, match="extra"):
        ZplPrinterConfig.model_validate({"id": "p", "driver": "zpl_printer", "host": "h", "dpii": 300})


async def test_label_states_after_an_abort_count_what_may_be_on_paper(tmp_path: Path, printer: FakeZplPrinter) -> None:
    driver, _ = make_driver(tmp_path, printer.port)
    async with running(driver):
        await driver.price_prepare(Change(1, ITEMS))
        await until_async(lambda: driver.price_confirmed(1))
        assert await driver.price_label_states(1) == {"1001": "new", "1002": "new", "1003": "new"}
        printer.core.print_seconds = 60  # v2 reaches the printer but takes its time to come out
        await driver.price_prepare(Change(2, [Item("1001", "4006381333931", 219, "Organic whole milk 1 l")]))
        assert await driver.price_label_states(2) in ({"1001": "old"}, {"1001": "unknown"})
        await until(lambda: printer.core.pending, what="v2 in the printer's buffer")
        assert await driver.price_label_states(2) == {"1001": "unknown"}  # written, not confirmed
        await driver.price_abort(2)
        # it was handed to the printer: it counts as printed until the old label is printed again
        assert await driver.price_label_states(2) == {"1001": "new"} and not await driver.price_restored(2)
        printer.core.hurry()
        await until_async(lambda: driver.price_restored(2), what="the v1 label printed again")
    assert [f[-1] for f in printer.core.printed_fields()][-2:] == ["1001  v2", "1001  v1"]


async def test_a_change_printed_ahead_is_marked_and_void_when_aborted_before_it(
        tmp_path: Path, printer: FakeZplPrinter) -> None:
    import time

    driver, ctx = make_driver(tmp_path, printer.port, swap_seconds=0)
    async with running(driver):
        ahead = Change(4, ITEMS[:1], effective_at=time.time() + 3600)
        await driver.price_prepare(ahead)
        await until(lambda: driver._queue and driver._queue.counts()["printed"] == 1, what="printed ahead")
        assert printer.core.printed_fields()[0][-2].startswith("valid from ")
        assert await driver.price_label_states(4) == {"1001": "old"}  # not on the shelf before its time
        assert not await driver.price_confirmed(4)
        await driver.price_abort(4)
        assert await driver.price_restored(4)  # never on the shelf: nothing to put back
        await asyncio.sleep(0.3)
    assert len(printer.core.printed) == 1
    assert any(k == "label" and e.get("void") for k, e in ctx.events)


async def test_reprint_is_a_job_per_request_and_an_old_queue_file_is_migrated(
        tmp_path: Path, printer: FakeZplPrinter) -> None:
    import sqlite3

    from storelink.drivers.label_queue import _V1_COLUMNS, LabelQueue

    old = sqlite3.connect(tmp_path / "zpl-labels-1.db")  # the queue file of the previous release
    old.executescript("""
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, version INTEGER NOT NULL, sku TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('new', 'restore')), payload BLOB NOT NULL, previous BLOB,
            previous_version INTEGER, state TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'printed', 'cancelled')),
            attempts INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL, note TEXT,
            UNIQUE (version, sku, kind));
        CREATE INDEX jobs_state ON jobs (state, id);
        CREATE TABLE versions (version INTEGER PRIMARY KEY, state TEXT NOT NULL, items INTEGER NOT NULL,
            updated REAL NOT NULL);
        INSERT INTO versions VALUES (1, 'committed', 1, 0);
        INSERT INTO jobs (version, sku, kind, payload, state, attempts, created, updated)
            VALUES (1, '1001', 'new', X'00', 'printed', 1, 0, 0);
    """)
    old.close()
    queue = LabelQueue(tmp_path / "zpl-labels-1.db")
    assert [(j["sku"], j["state"]) for j in queue.jobs()] == [("1001", "printed")]
    assert "request" not in _V1_COLUMNS
    queue.close()
    driver, _ = make_driver(tmp_path, printer.port)
    async with running(driver):
        change = Change(1, ITEMS[:1])
        assert await driver.price_reprint("r1", change) == 1
        assert await driver.price_reprint("r1", change) == 0  # the same request again: already queued
        assert await driver.price_reprint("r2", change) == 1  # another request: another job
        await until(lambda: len(printer.core.printed) == 2, what="both reprints printed")
