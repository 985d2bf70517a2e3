"""The local status page in real headless Chromium (Playwright driving Debian's chromium), plus /metrics.

The page loads, shows the live state, follows the broker going down and coming back through server-sent events,
and refuses an action without the token. Screenshots land in the test's tmp dir for a human to look at.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from storelink.remote.signing import keygen
from tests.helpers import GatewayProcess, Mosquitto, wait_for
from tests.hq_helpers import STORE, start_gateway

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

            phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
            phone.goto(gateway.base_url + "/")
            expect(phone.locator("#uplink-state")).to_have_text("Offline")
            phone.screenshot(path=str(tmp_path / "status-offline-phone.png"), full_page=True)

            mosquitto.start()
            expect(page.locator("#uplink-state")).to_have_text("Connected", timeout=15_000)
            expect(page.locator("#outbox-depth")).to_have_text("Nothing waiting", timeout=10_000)
        finally:
            browser.close()
    if os.environ.get("STORELINK_SCREENSHOTS"):
        for shot in tmp_path.glob("*.png"):
            shutil.copy(shot, os.environ["STORELINK_SCREENSHOTS"])
