"""kill -9 of the gateway at each phase of a price change; after a restart every till and label is on one version.

The gateway kills itself with SIGKILL at an exact point (STORELINK_CRASH_AT, a test-only hook: see
gateway/prices/crashpoints.py), is started again without it, and must finish the change from its journal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import GatewayProcess, Mosquitto, Subscriber, wait_for
from tests.prices_helpers import batch, items, price_events, wait_event
from tests.test_prices_atomic import TAGGED, Rig, wait_settled

CHANGED = ["SKU000001", "SKU000004", "SKU000011"]


@pytest.mark.parametrize("point", ["after_staging", "mid_prepare", "after_decision", "mid_commit"])
def test_kill9_at_each_phase_ends_on_one_version(tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber,
                                                 point: str) -> None:
    rig = Rig(tmp_path, mosquitto)
    try:
        rig.start()
        rig.floor.start_tills()
        rig.hq.batch(batch(rig.key, 1, items(16, base=100)))
        wait_event(subscriber, "price.committed", version=1)
        wait_settled(rig, 1, TAGGED, 30, what="version 1 everywhere")
        assert rig.gw is not None
        rig.gw.kill9()

        crashing = rig.start(env={"STORELINK_CRASH_AT": point})
        rig.wait_devices_ok()  # the tills reconnected: they take part (mid_commit stops after the first till)
        rows = items(16, base=100)
        for sku in CHANGED:
            rows[int(sku[3:])]["price"] = 70 if sku != "SKU000004" else 130
        rig.hq.batch(batch(rig.key, 2, rows))
        assert crashing.proc is not None
        assert crashing.proc.wait(30) == -9, f"the gateway did not kill itself at {point}"
        assert f"STORELINK_CRASH_AT={point}" in crashing.log.read_text()

        rig.gw = GatewayProcess(rig.config, rig.http_port).start()
        wait_for(lambda: [e for e in price_events(subscriber, "price.committed") + price_events(
            subscriber, "price.aborted") if e["data"].get("version") == 2], 60, what="version 2 decided")
        outcome = 2 if price_events(subscriber, "price.committed")[-1]["data"]["version"] == 2 else 1
        assert outcome == 2, "a journal at or past prepare finishes the change (prepare is idempotent)"
        wait_settled(rig, 2, CHANGED, 40, what="every till, tag and label on version 2")
        assert set(rig.floor.till_versions().values()) == {2}
        for till in rig.floor.tills:
            prices = rig.floor.till_prices(till)
            assert (prices["SKU000001"], prices["SKU000004"], prices["SKU000011"]) == (70, 130, 70)
        wait_event(subscriber, "price.confirmed", version=2, timeout=30)
        # labels of version 1 that were printed but not confirmed before the kill print again; until they are
        # confirmed the book keeps min(old, new) for them, so wait for every transition to close
        wait_for(lambda: rig.gw.get("/api/v1/prices/state")[1]["transition"] == [], 30,  # type: ignore[union-attr]
                 what="every label confirmed")
        assert rig.floor.lookup("1", "SKU000004")["price"] == 130  # type: ignore[index]
        _s, state = rig.gw.get("/api/v1/prices/state")
        assert state["active_version"] == 2 and state["pending"] is None
    finally:
        rig.close()
