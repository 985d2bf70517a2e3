"""`storelink hq serve` in real headless Chromium (Playwright driving Debian's chromium), its JSON API and /metrics.

230 simulated stores in two groups report through a real Mosquitto to a real `storelink hq ingest` (embedded
SQLite); some have problems (offline, a device down, behind on a group price batch, a missing event). The fleet
page lists them in pages, filters by group and problem, and a store's page shows its gap and alert.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from storelink.drivers.sim.fleet import Fleet
from storelink.hq.batch import build_batch
from storelink.hq.dashboard import Dashboard
from storelink.hq.db import open_database
from storelink.remote.signing import keygen
from tests.helpers import Mosquitto, wait_for
from tests.hostile_helpers import raw_http
from tests.ingest_helpers import IngestProcess, ServeProcess, one
from tests.test_status_page import CHROMIUM, CHROMIUM_ARGS

N = 230


def seed(fleet: Fleet, port: int) -> None:
    by_id = {s.store_id: s for s in fleet.stores}
    fleet.births()
    for s in fleet.stores:
        north = s.groups == ["north"]
        version = 4 if s.store_id == "store-00008" else (5 if north else 3)
        fleet.send(s, *s.outbox_state(), retain=True)
        fleet.send(s, *s.prices_state(version), retain=True)
        fleet.send(s, *s.device_state("till-1"), retain=True)
    fleet.send(by_id["store-00003"], *by_id["store-00003"].offline(), retain=True)
    fleet.send(by_id["store-00005"], *by_id["store-00005"].device_state("till-1", "degraded", "no answer to PING"),
               retain=True)
    fleet.burst(3, kind="scan", skip={"store-00009": {2}})
    # Head office's batch for the group north, in force for ten minutes: its stores should be on version 5.
    key = keygen()
    b = build_batch([{"sku": "1001", "price": 199}], version=5, batch_id="north-v5", group="north",
                    key=key.private_b64, effective_at=datetime.now(UTC) - timedelta(minutes=10))
    for message in b.messages:
        fleet.links[0].publish("storelink/groups/north/prices/batch", message)
    fleet.drain()


def test_fleet_dashboard_in_headless_chromium(tmp_path: Path, mosquitto: Mosquitto) -> None:
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: run the README's test command (scripts/test.sh)"
    from playwright.sync_api import expect, sync_playwright

    database = f"sqlite:///{tmp_path / 'hq.db'}"
    ingest = IngestProcess(tmp_path, database, mosquitto.port, "w1", "--gap-grace", "1").start()
    fleet = Fleet("127.0.0.1", mosquitto.port, [f"store-{i:05d}" for i in range(N)], connections=2,
                  groups=["north", "south"])
    db = open_database(database)
    serve = None
    try:
        seed(fleet, mosquitto.port)
        gap_store = next(s for s in fleet.stores if s.store_id == "store-00009")
        wait_for(lambda: one(db, "SELECT count(*) FROM seq_gaps") == 1, 30, what="the gap seen")
        fleet.send(gap_store, *gap_store.outbox_state(), retain=True)  # its next report: it evicted nothing
        fleet.drain()
        wait_for(lambda: one(db, "SELECT count(*) FROM store_problems WHERE problem = 'gaps'") == 1, 30,
                 what="the gap settled as missing")
        wait_for(lambda: one(db, "SELECT count(*) FROM store_problems WHERE problem = 'behind'") == 1, 30,
                 what="the store behind on prices")
        serve = ServeProcess(tmp_path, database)

        status, body = serve.get("/api/v1/fleet?problem=offline")
        assert status == 200 and [s["store_id"] for s in body["stores"]] == ["store-00003"]
        assert body["fleet"]["stores"] == N and body["fleet"]["offline"] == 1
        assert body["problem_counts"]["devices"] == 1 and body["problem_counts"]["behind"] == 1
        status, detail = serve.get("/api/v1/stores/store-00009")
        assert status == 200 and detail["gaps"][0] == {**detail["gaps"][0], "first_seq": 2, "last_seq": 2,
                                                       "state": "missing"}
        assert "data" not in detail["recent_events"][0]  # kind, device, seq and time only
        assert serve.get("/api/v1/stores/nope")[0] == 404
        assert serve.get("/api/v1/fleet?problem=bogus")[0] == 400
        status, page = serve.get("/api/v1/fleet?group=south&limit=50")
        assert page["total"] == N // 2 and len(page["stores"]) == 50 and page["next"] == page["stores"][-1]["store_id"]
        status, metrics = serve.get("/metrics")
        assert 'storelink_fleet_stores{state="offline"} 1.0' in metrics
        assert 'storelink_fleet_stores_with_problem{problem="gaps"} 1.0' in metrics
        assert 'storelink_fleet_alerts_open{kind="seq_gap"} 1.0' in metrics
        assert 'storelink_ingest_received_total{worker="w1"}' in metrics

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(serve.base_url + "/")
                expect(page.locator("#fleet-size")).to_have_text(f"{N} stores")
                expect(page.locator("#stores tr")).to_have_count(100)
                expect(page.locator("#page-info")).to_have_text(f"1-100 of {N}")
                expect(page.locator("#verdict")).to_contain_text("missing events")
                expect(page.locator("#stores tr[data-store=store-00003]")).to_contain_text("offline")
                expect(page.locator("#stores tr[data-store=store-00005]")).to_contain_text("till-1: degraded")
                expect(page.locator("#stores tr[data-store=store-00008]")).to_contain_text("latest v5")
                page.screenshot(path=str(tmp_path / "fleet.png"), full_page=True)
                page.locator("#next").click()
                expect(page.locator("#page-info")).to_have_text(f"101-200 of {N}")
                expect(page.locator("#stores tr").first).to_have_attribute("data-store", "store-00100")

                page.select_option("#group", "north")
                expect(page.locator("#page-info")).to_have_text(f"1-100 of {N // 2}")
                page.locator("#problems button[data-problem=behind]").click()
                expect(page.locator("#stores tr")).to_have_count(1)
                expect(page.locator("#stores tr").first).to_have_attribute("data-store", "store-00008")
                assert "problem=behind" in page.url and "group=north" in page.url

                page.select_option("#group", "")
                page.locator("#problems button[data-problem=gaps]").click()
                expect(page.locator("#stores tr")).to_have_count(1)
                page.locator("#stores tr a").first.click()
                expect(page.locator("#store")).to_have_text("store-00009")
                expect(page.locator("#gaps tr[data-state=missing]")).to_contain_text("2")
                expect(page.locator("#alerts")).to_contain_text("seq 2 never arrived")
                expect(page.locator("#verdict")).to_contain_text("1 event missing")
                page.screenshot(path=str(tmp_path / "store.png"), full_page=True)

                phone = browser.new_page(viewport={"width": 390, "height": 844})
                phone.goto(serve.base_url + "/?problem=offline")
                expect(phone.locator("#stores tr")).to_have_count(1)
                phone.screenshot(path=str(tmp_path / "fleet-phone.png"), full_page=True)
            finally:
                browser.close()
        # The page is read-only: the API has no method that changes anything.
        assert json.loads(json.dumps(serve.get("/api/v1/alerts")[1]))["alerts"][0]["kind"] == "seq_gap"
    finally:
        db.close()
        fleet.close()
        ingest.stop()
        if serve is not None:
            serve.stop()
    if os.environ.get("STORELINK_SCREENSHOTS"):
        for shot in tmp_path.glob("*.png"):
            shutil.copy(shot, os.environ["STORELINK_SCREENSHOTS"])
    time.sleep(0)


async def test_the_dashboard_answers_bad_expect_headers_and_unknown_paths_plainly(tmp_path: Path) -> None:
    """Like the store's page (tests/test_hostile_input.py): an Expect header of non-UTF-8 bytes is a 417, never
    aiohttp's 500, on a route and on an unknown path; a wrong method a 405; an unknown API path a JSON 404."""
    dashboard = Dashboard(f"sqlite:///{tmp_path / 'hq.db'}", "127.0.0.1:0")
    await dashboard.start()
    try:
        assert dashboard.bound is not None
        port = dashboard.bound[1]

        def ask(request: bytes) -> bytes:
            return raw_http(port, request + b"Host: x\r\nConnection: close\r\n\r\n")

        for path in (b"/healthz", b"/api/v1/fleet", b"/no/such/page"):
            answer = await asyncio.to_thread(ask, b"GET " + path + b" HTTP/1.1\r\nExpect: \xff\xfe-continue\r\n")
            assert answer.startswith(b"HTTP/1.1 417 "), (path, answer[:200])
        assert (await asyncio.to_thread(ask, b"POST /api/v1/fleet HTTP/1.1\r\nContent-Length: 0\r\n")
                ).startswith(b"HTTP/1.1 405 ")
        missing = await asyncio.to_thread(ask, b"GET /api/v1/nothing HTTP/1.1\r\n")
        assert missing.startswith(b"HTTP/1.1 404 ") and b'"error"' in missing
        assert (await asyncio.to_thread(ask, b"GET /healthz HTTP/1.1\r\n")).startswith(b"HTTP/1.1 200 ")
    finally:
        await dashboard.stop()
