"""openepaperlink against a fake access point on loopback (aiohttp server speaking the AP's endpoints):
confirmation by pending/hash, an AP that is down, a tag that never checks in, abort, restart, audit."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storelink.drivers.base import Health, PrepareFailed
from storelink.drivers.openepaperlink import OpenEPaperLink, OpenEPaperLinkConfig
from storelink.drivers.sim.openepaperlink import FakeAccessPoint
from tests.label_harness import Change, Item, RecordingContext, until, until_async

MACS = {"1001": "00000B57A1B2C3D4", "1002": "00000B57A1B2C3D5", "1003": "00000B57A1B2C3D6"}
ITEMS = [
    Item("1001", "4006381333931", 199, "Organic whole milk 1 l", 199, "l"),
    Item("1002", "036000291452", 349, "Peanut butter crunchy", 1396, "kg"),
    Item("1003", None, 99, "Loose bread roll"),
    Item("2000", None, 500, "Item without a shelf tag"),
]


def make_driver(tmp_path: Path, ap: FakeAccessPoint, tags: dict[str, str] = MACS,
                **extra: object) -> tuple[OpenEPaperLink, RecordingContext]:
    cfg = OpenEPaperLinkConfig.model_validate({
        "id": "esl-1", "driver": "openepaperlink", "url": ap.url, "tags": tags, "poll_interval": 0.1,
        "request_timeout": 2.0, **extra,
    })
    ctx = RecordingContext(tmp_path, "esl-1")
    return OpenEPaperLink(cfg, ctx), ctx


@contextlib.asynccontextmanager
async def running(driver: OpenEPaperLink) -> AsyncIterator[OpenEPaperLink]:
    task = asyncio.create_task(driver.run())
    try:
        yield driver
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def ap() -> AsyncIterator[FakeAccessPoint]:
    fake = await FakeAccessPoint(list(MACS.values()), checkin_delay=0.3).start()
    yield fake
    await fake.close()


async def test_push_then_confirm_when_tags_check_in(tmp_path: Path, ap: FakeAccessPoint) -> None:
    driver, ctx = make_driver(tmp_path, ap)
    async with running(driver):
        await driver.price_prepare(Change(1, ITEMS))
        await driver.price_prepare(Change(1, ITEMS))  # repeated by a recovering coordinator: no second upload
        assert len(ap.uploads) == 3  # the item without a tag is skipped
        assert not await driver.price_confirmed(1)  # pushed, but no tag has checked in yet
        await until_async(lambda: driver.price_confirmed(1), what="all tags confirmed")
        await until(lambda: ctx.state == Health.OK)
    content = json.loads(ap.tags[MACS["1002"]].content or "")
    texts = [e["text"][2] for e in content]
    assert texts == ["Peanut butter crunchy", "€3.49", "€13.96 / kg", "v1"]
    assert await driver.price_reported_version() == 1
    assert ("label", {"event": "esl_confirmed", "version": 1}) in ctx.events
    assert (tmp_path / "esl-esl-1.db").exists()


async def test_ap_down_fails_prepare_and_marks_offline(tmp_path: Path, ap: FakeAccessPoint) -> None:
    await ap.stop()
    driver, ctx = make_driver(tmp_path, ap)
    async with running(driver):
        with pytest.raises(PrepareFailed, match="unreachable"):
            await driver.price_prepare(Change(1, ITEMS))
        await until(lambda: ctx.state == Health.OFFLINE, what="offline")
        assert "unreachable" in (ctx.error or "")
        assert not await driver.price_confirmed(1)
        await ap.start()
        await until(lambda: ctx.state == Health.OK, what="back online")
        await driver.price_prepare(Change(2, ITEMS))
        await until_async(lambda: driver.price_confirmed(2))


async def test_busy_ap_and_unknown_tag_fail_prepare_with_the_reason(tmp_path: Path, ap: FakeAccessPoint) -> None:
    driver, _ = make_driver(tmp_path, ap, tags=MACS | {"1003": "00000B57FFFFFFFF"})
    with pytest.raises(PrepareFailed, match="not known to the access point"):
        await driver.price_prepare(Change(1, ITEMS))
    ap.busy = True
    with pytest.raises(PrepareFailed, match="HTTP 409"):
        await driver.price_prepare(Change(2, ITEMS[:1]))
    await driver.ap.close()


async def test_tag_that_never_checks_in_blocks_confirmation(tmp_path: Path, ap: FakeAccessPoint) -> None:
    ap.tags[MACS["1003"]].never_checks_in = True
    driver, ctx = make_driver(tmp_path, ap, stale_after=0.5)
    async with running(driver):
        await driver.price_prepare(Change(1, ITEMS))
        await until(lambda: ap.tags[MACS["1001"]].pending == 0 and ap.tags[MACS["1002"]].pending == 0)
        await until(lambda: ctx.state == Health.DEGRADED, what="stale tag reported")
        assert MACS["1003"] in (ctx.error or "")
        assert not await driver.price_confirmed(1)
        assert await driver.price_reported_version() is None


async def test_abort_puts_the_previous_content_back(tmp_path: Path, ap: FakeAccessPoint) -> None:
    driver, _ = make_driver(tmp_path, ap)
    async with running(driver):
        await driver.price_prepare(Change(1, ITEMS))
        await until_async(lambda: driver.price_confirmed(1))
        v1 = {m: ap.tags[m].content for m in MACS.values()}
        await driver.price_prepare(Change(2, [Item("1001", None, 249, "Organic whole milk 1 l", 249, "l")]))
        await ap.stop()  # the AP is down when the abort comes: the loop puts the old content back later
        await driver.price_abort(2)
        await driver.price_abort(2)
        await ap.start()
        await until(lambda: ap.uploads[-1] == (MACS["1001"], v1[MACS["1001"]]), what="v1 content pushed back")
    assert {m: ap.tags[m].content for m in MACS.values()} == v1
    assert not await driver.price_confirmed(2)
    with pytest.raises(PrepareFailed, match="aborted"):
        await driver.price_prepare(Change(2, ITEMS))
    assert await driver.price_reported_version() == 1


async def test_abort_of_a_first_push_restores_what_the_ap_held(tmp_path: Path, ap: FakeAccessPoint) -> None:
    ap._apply(MACS["1001"], '[{"text":[0,0,"set by hand","fonts/bahnschrift20","black"]}]')
    driver, ctx = make_driver(tmp_path, ap, tags={"1001": MACS["1001"], "1002": MACS["1002"]})
    await driver.price_prepare(Change(1, ITEMS))
    await driver.price_abort(1)
    assert ap.tags[MACS["1001"]].content == '[{"text":[0,0,"set by hand","fonts/bahnschrift20","black"]}]'
    # the other tag never had content: nothing to restore, and that is reported
    assert ("label", {"event": "esl_no_restore", "version": 1, "skus": ["1002"]}) in ctx.events
    await driver.ap.close()


async def test_confirmation_state_survives_a_restart(tmp_path: Path, ap: FakeAccessPoint) -> None:
    ap.checkin_delay = 0.5
    driver, _ = make_driver(tmp_path, ap)
    await driver.price_prepare(Change(7, ITEMS))
    await driver.ap.close()
    again, _ = make_driver(tmp_path, ap)  # a new process: what was pushed is known from the state file
    async with running(again):
        await until_async(lambda: again.price_confirmed(7))
    assert len(ap.uploads) == 3


async def test_audit_reports_drift_and_many_tags_use_paging(tmp_path: Path) -> None:
    macs = {str(3000 + i): f"00000C0FFEE0{i:04X}" for i in range(40)}
    ap = await FakeAccessPoint(list(macs.values()), checkin_delay=0.1).start()
    try:
        driver, _ = make_driver(tmp_path, ap, tags=macs, max_parallel=8)
        items = [Item(sku, None, 100 + n, f"Item {sku}") for n, sku in enumerate(macs)]
        async with running(driver):
            await driver.price_prepare(Change(1, items))
            await until_async(lambda: driver.price_confirmed(1), what="40 tags confirmed via paged get_db")
            states = await driver.tag_states()
            assert len(states) == 40 and not any(s["drift"] for s in states)
            ap._apply(macs["3005"], "[]")  # someone changed a tag in the AP's web UI
            ap.tags[macs["3005"]].pending = 0
            drifted = [s for s in await driver.tag_states() if s["drift"]]
            assert [(d["sku"], d["version"]) for d in drifted] == [("3005", 1)]
    finally:
        await ap.close()


def test_config_checks_macs_urls_and_mapping_files(tmp_path: Path) -> None:
    base = {"id": "e", "driver": "openepaperlink", "url": "http://10.0.0.5"}
    cfg = OpenEPaperLinkConfig.model_validate(base | {"tags": {"1": "0b:57:a1:b2:c3:d4"}})
    assert cfg.tag_map() == {"1": "00000B57A1B2C3D4"}
    with pytest.raises(ValueError, match="not a tag MAC"):
        OpenEPaperLinkConfig.model_validate(base | {"tags": {"1": "xyz"}})
    with pytest.raises(ValueError, match="mapped twice"):
        OpenEPaperLinkConfig.model_validate(base | {"tags": {"1": "0B57A1B2C3D4", "2": "00000B57A1B2C3D4"}})
    with pytest.raises(ValueError, match="url must be"):
        OpenEPaperLinkConfig.model_validate(base | {"url": "10.0.0.5"})
    good = tmp_path / "tags.csv"
    good.write_text("sku,mac\n# aisle 3\n1001,0B57A1B2C3D4\n1002,00000B57A1B2C3D5\n")
    assert OpenEPaperLinkConfig.model_validate(base | {"tags_file": str(good)}).tag_map() == {
        "1001": "00000B57A1B2C3D4", "1002": "00000B57A1B2C3D5"}
    bad = tmp_path / "bad.csv"
    bad.write_text("1001,0B57A1B2C3D4\n1002,nope\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: 'nope' is not a tag MAC"):
        OpenEPaperLinkConfig.model_validate(base | {"tags_file": str(bad)})
