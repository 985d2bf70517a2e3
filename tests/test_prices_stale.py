"""A till that was away during a change is shown stale and brought up to the book; the audit reports drift."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Mosquitto, Subscriber, wait_for
from tests.prices_helpers import batch, items, wait_event
from tests.test_prices_atomic import MACS, TAGGED, Rig, wait_settled


def _state(rig: Rig) -> dict:  # type: ignore[type-arg]
    assert rig.gw is not None
    return rig.gw.get("/api/v1/prices/state")[1]  # type: ignore[no-any-return]


def test_offline_till_is_stale_until_caught_up_and_drift_is_reported(
        tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    rig = Rig(tmp_path, mosquitto)
    rig.config.write_text(rig.config.read_text().replace("audit_interval = 3600", "audit_interval = 1"))
    try:
        rig.start()
        rig.floor.start_tills(["1"])  # till 2 is switched off
        wait_for(lambda: rig.floor.tills["1"].hello_reply, 15, what="till 1 connected")
        rig.hq.batch(batch(rig.key, 1, items(10, base=300)))
        e = wait_event(subscriber, "price.committed", version=1)
        assert e["data"]["devices"]["till-2"] == "excluded"
        wait_for(lambda: _state(rig)["devices"]["till-2"]["state"] == "stale", 15, what="till-2 shown stale")
        # holding (at most min(old, new)) until the labels confirm, then current
        wait_for(lambda: _state(rig)["devices"]["till-1"]["state"] == "current", 15, what="till-1 current")

        rig.floor.start_tills(["2"])  # it comes back with no prices at all
        e = wait_event(subscriber, "price.caught_up", device="till-2", timeout=30)
        assert e["data"]["version"] == 1
        assert rig.floor.tills["2"].version == 1 and rig.floor.till_prices("2")["SKU000009"] == 300
        wait_for(lambda: _state(rig)["devices"]["till-2"]["state"] == "current", 15, what="till-2 current")

        wait_settled(rig, 1, TAGGED, 30, what="labels on version 1")
        wait_event(subscriber, "price.confirmed", version=1)
        tag = rig.floor.ap.tags[MACS["SKU000002"]]
        tag.hash = "f" * 32  # someone re-pointed this tag behind the gateway's back
        e = wait_event(subscriber, "price.drift", timeout=30, drifting=1)
        assert e["data"]["devices"][0]["device"] == "esl" and "SKU000002" in e["data"]["devices"][0]["problem"]
    finally:
        rig.close()
