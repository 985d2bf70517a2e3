"""The local status page in real headless Chromium (Playwright driving Debian's chromium), plus /metrics.

The page loads, shows the live state, follows the broker going down and coming back through server-sent events,
refuses an action without the token, shows a price change while its labels confirm (which items, labels left,
what the tills charge meanwhile), and never scrolls sideways on a 360 px phone. Screenshots land in the test's tmp
dir for a human to look at (STORELINK_SCREENSHOTS=DIR copies them there).
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storelink.remote.signing import keygen
from tests.helpers import GatewayProcess, Mosquitto, Subscriber, wait_for
from tests.hq_helpers import STORE, start_gateway
from tests.prices_helpers import batch, items, wait_event
from tests.test_prices_atomic import TAGGED, Rig, wait_settled

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "t" * 24


@pytest.fixture
def gateway(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[GatewayProcess]:
    pos = tmp_path / "pos"
    pos.mkdir()
    gw = start_gateway(tmp_path, mosquitto.port, keygen(),
                       f'[[devices]]\nid = "pos1"\ndriver = "plu_file"\ndirectory = "{pos}"\n')
    gw.wait_online(10, what="connected")
    yield gw
    gw.stop()


def assert_no_sideways_scrolling(page: Any) -> None:
    width = page.evaluate("window.innerWidth")
    wide = page.evaluate("document.documentElement.scrollWidth")
    culprits = page.evaluate(
        "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)"
        ".slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className)")
    assert wide <= width, f"the page is {wide} px wide in a {width} px window: {culprits}"


def _fetch(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


def test_metrics_and_page_files(gateway: GatewayProcess) -> None:
    gateway.post("/api/v1/events", {"kind": "scan", "device": "scanner1", "data": {"code": "4006381333931"}})
    status, ctype, text = _fetch(gateway.base_url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert "storelink_uplink_connected 1.0" in text
    assert 'storelink_device_state{device="pos1",driver="plu_file",state="ok"} 1.0' in text
    assert "storelink_outbox_accepted_total 1.0" in text
    assert "storelink_config_version 0.0" in text
    status, ctype, html = _fetch(gateway.base_url + "/")
    assert status == 200 and "text/html" in ctype and "/static/app.js" in html
    view = gateway.get("/api/v1/page")[1]
    assert view["recent_events"][0]["kind"] == "scan"
    assert "data" not in view["recent_events"][0] and "4006381333931" not in str(view)  # no event data shown
    # Actions: refused without the token, with a wrong one, and read-only commands are not actions.
    assert gateway.post("/api/v1/actions/restart-device", {"args": {"device": "pos1"}})[0] == 401
    assert gateway.post("/api/v1/actions/restart-device", {"args": {"device": "pos1"}},
                        headers={"Authorization": "Bearer " + "x" * 24})[0] == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert gateway.post("/api/v1/actions/ping", {}, headers=auth)[0] == 405
    code, body = gateway.post("/api/v1/actions/restart-device", {"args": {"device": "nope"}}, headers=auth)
    assert code == 422 and "pos1" in body["error"]
    code, body = gateway.post("/api/v1/actions/restart-device", {"args": {"device": "pos1"}}, headers=auth)
    assert code == 200 and body["result"] == {"restarting": "pos1"}


def test_page_in_headless_chromium(tmp_path: Path, gateway: GatewayProcess, mosquitto: Mosquitto) -> None:
    # scripts/test.sh installs Debian's chromium: a missing browser is a broken set-up, not a reason to skip.
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: run the README's test command (scripts/test.sh)"
    from playwright.sync_api import expect, sync_playwright

    gateway.post("/api/v1/events", [{"kind": "till.sale", "device": "till1", "data": {"total": 1299}}])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(gateway.base_url + "/")
            expect(page.locator("#store")).to_have_text(STORE)
            expect(page.locator("#uplink-state")).to_have_text("Connected")
            expect(page.locator("#verdict")).to_contain_text("All good")
            expect(page.locator("#devices tr[data-device=pos1]")).to_contain_text("ok")
            expect(page.locator("#events")).to_contain_text("till.sale")
            expect(page.locator("#events")).not_to_contain_text("1299")  # event data never shown
            page.screenshot(path=str(tmp_path / "status-ok.png"), full_page=True)

            # The broker goes down: the page follows without a reload.
            mosquitto.stop()
            expect(page.locator("#uplink-state")).to_have_text("Offline", timeout=15_000)
            expect(page.locator("#verdict")).to_contain_text("Head office unreachable")
            expect(page.locator("#verdict")).to_contain_text(f"connection refused by 127.0.0.1:{mosquitto.port}")
            gateway.post("/api/v1/events", {"kind": "till.sale", "device": "till1", "data": {}})
            expect(page.locator("#outbox-depth")).to_have_text("1 waiting", timeout=10_000)

            # An action without the token is refused, and the page says why.
            page.locator("#devices tr[data-device=pos1] button").click()
            expect(page.locator("#action-result")).to_contain_text("access token is missing or wrong")
            assert gateway.get("/api/v1/status")[1]["devices"][0]["restarts"] == 0
            # With the token it is done.
            page.fill("#token", TOKEN)
            page.locator("#devices tr[data-device=pos1] button").click()
            expect(page.locator("#action-result")).to_contain_text("Done")
            wait_for(lambda: gateway.get("/api/v1/status")[1]["devices"][0]["restarts"] == 1, 10)

            phone = browser.new_page(viewport={"width": 360, "height": 740}, device_scale_factor=2)
            phone.goto(gateway.base_url + "/")
            expect(phone.locator("#uplink-state")).to_have_text("Offline")
            assert_no_sideways_scrolling(phone)
            phone.screenshot(path=str(tmp_path / "status-offline-phone.png"), full_page=True)

            mosquitto.start()
            expect(page.locator("#uplink-state")).to_have_text("Connected", timeout=15_000)
            expect(page.locator("#outbox-depth")).to_have_text("Nothing waiting", timeout=10_000)
        finally:
            browser.close()
    if os.environ.get("STORELINK_SCREENSHOTS"):
        for shot in tmp_path.glob("*.png"):
            shutil.copy(shot, os.environ["STORELINK_SCREENSHOTS"])


def test_a_price_change_on_the_page_while_labels_confirm(tmp_path: Path, mosquitto: Mosquitto,
                                                        subscriber: Subscriber) -> None:
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: run the README's test command (scripts/test.sh)"
    from playwright.sync_api import expect, sync_playwright

    rig = Rig(tmp_path, mosquitto, tills=1)
    try:
        rig.start()
        rig.floor.start_tills()
        rows = items(8, base=100)
        rig.hq.batch(batch(rig.key, 1, rows))
        wait_settled(rig, 1, TAGGED, 30, what="version 1 on the shelf")
        assert rig.gw is not None
        wait_for(lambda: rig.gw.get("/api/v1/prices/state")[1]["transition"] == [], 30,  # type: ignore[union-attr]
                 what="version 1's labels confirmed")
        rig.floor.ap.checkin_delay = 8.0  # the tags take a while to show version 2: the page shows the transition
        rows[1]["price"], rows[2]["price"] = 250, 50  # SKU000001 goes up from 1.00, SKU000002 down
        rig.hq.batch(batch(rig.key, 2, rows))
        wait_event(subscriber, "price.committed", version=2)
        state = wait_for(lambda: (s := rig.gw.get("/api/v1/prices/state")[1])["transition"]  # type: ignore[union-attr]
                         and s["transition"][0]["labels"].get("esl", {}).get("total") and s, 10, what="label counts")
        change = state["transition"][0]
        assert change["version"] == 2 and change["skus"] == 2 and change["labels_left"] >= 1
        assert [(i["sku"], i["old_price"], i["new_price"], i["charged"]) for i in change["items"]] == [
            ("SKU000001", 100, 250, 100), ("SKU000002", 100, 50, 50)]
        assert change["labels"]["esl"]["total"] == 2
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 360, "height": 740}, device_scale_factor=2)
                page.goto(rig.gw.base_url + "/")
                box = page.locator("#prices .transition")
                expect(box).to_contain_text("Price change to version 2 reaching the shelf: 2 items")
                expect(box).to_contain_text("tills charge the lower of the old and the new price")
                expect(box.locator(".labels-left")).to_contain_text("Labels left:")
                expect(box.locator("li[data-device=esl]")).to_contain_text("of 2 done")
                expect(box.locator("li[data-sku=SKU000001]")).to_contain_text("€1.00 → €2.50")
                expect(box.locator("li[data-sku=SKU000001]")).to_contain_text("tills charge €1.00")
                expect(box.locator("li[data-sku=SKU000002]")).to_contain_text("tills charge €0.50")
                assert_no_sideways_scrolling(page)
                page.screenshot(path=str(tmp_path / "status-price-change-phone.png"), full_page=True)
                # Every tag checked in: the transition is over and the page says so without a reload.
                expect(page.locator("#prices .transition")).to_have_count(0, timeout=30_000)
                expect(page.locator("#prices")).to_contain_text("Version 2")
            finally:
                browser.close()
        assert rig.floor.lookup("1", "SKU000001")["price"] == 250  # type: ignore[index]
    finally:
        rig.close()
    if os.environ.get("STORELINK_SCREENSHOTS"):
        for shot in tmp_path.glob("*.png"):
            shutil.copy(shot, os.environ["STORELINK_SCREENSHOTS"])
