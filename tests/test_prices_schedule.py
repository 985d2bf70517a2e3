"""Scheduled price changes (`effective_at`) on a real `storelink run`: prepared ahead, switched at the till within a
second of effective_at and never before, the till at or below the shelf at every instant; several scheduled
versions queue, a newer batch supersedes a scheduled one, a kill -9 while waiting still switches on time, and a
store whose clock is not synchronised refuses to schedule."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.helpers import GatewayProcess, Mosquitto, Subscriber, wait_for
from tests.prices_helpers import batch, items, price_events, wait_event
from tests.store_floor import ShelfWatch
from tests.test_prices_atomic import Rig

SYNCED = "clock_synchronised = true\n"  # this test box's kernel clock is not NTP-synchronised
# A paper label printed ahead goes on the shelf by hand from the time printed on it; the tills switch within a
# second of that time, so the model puts such a label up one second after it (docs/prices.md says so).
SWAP = 1.0


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _ahead(seconds: float) -> float:
    """A whole second at least `seconds` from now (manifests carry effective_at to the second)."""
    return float(math.ceil(time.time() + seconds))


@dataclass
class LookupPoller:
    """Polls LOOKUP on a till for `skus` in a thread: (sent, answered, sku, price, version, shelf at both ends)."""

    rig: Rig
    skus: list[str]
    watch: ShelfWatch
    samples: list[tuple[float, float, str, int, int, list[int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _shelf(self, sku: str) -> list[int]:
        now = time.time()
        tag = self.rig.floor.tag_price(sku) if sku in self.rig.floor.tag_of else None
        return [p for p in (tag, self.watch.paper(sku, now)) if p is not None]

    def _run(self) -> None:
        while not self._stop.is_set():
            for sku in self.skus:
                before, shelf_before = time.time(), self._shelf(sku)
                try:
                    item = self.rig.floor.lookup("2", sku)
                except (ConnectionError, TimeoutError):
                    continue  # the till is reconnecting (the gateway restarted)
                after, shelf_after = time.time(), self._shelf(sku)
                if item is not None:
                    self.samples.append((before, after, sku, item["price"], item["version"],
                                         shelf_before + shelf_after))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def above_shelf(self) -> list[str]:
        # the shelf may change during the round trip: compare with what it showed at either end
        return [f"{sku} at {a:.3f}: till {p} > shelf {s}" for _b, a, sku, p, _v, s in self.samples if s and p > min(s)]

    def first(self, sku: str, price: int) -> float:
        """When LOOKUP first answered `price` for `sku` (the time the request was sent)."""
        return min(b for b, _a, s, p, _v, _sh in self.samples if s == sku and p == price)

    def before(self, sku: str, t: float) -> set[int]:
        """Every price LOOKUP answered for `sku` in requests answered before `t`."""
        return {p for _b, a, s, p, _v, _sh in self.samples if s == sku and a < t}


def _switched(watch: ShelfWatch, till: str, sku: str, price: int) -> float:
    return min(t for t, tl, s, c in watch.timeline if tl == till and s == sku and c == price)


def test_a_scheduled_decrease_and_increase_switch_on_time_and_never_above_the_shelf(
        tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    rig = Rig(tmp_path, mosquitto, checkin=0.5, print_seconds=0.1, prices=SYNCED)
    try:
        rig.start_on_version_1(subscriber, 10, 1000)
        up, down, paper = "SKU000001", "SKU000002", "SKU000007"  # tag+paper up, tag+paper down, paper only down
        effective = _ahead(3.0)
        watch = ShelfWatch(rig.floor, [up, down, paper], valid_from={2: effective + SWAP})
        poll = LookupPoller(rig, [up, down, paper], watch)
        rows = items(10, base=1000)
        rows[1]["price"], rows[2]["price"], rows[7]["price"] = 1300, 700, 800
        rig.hq.batch(batch(rig.key, 2, rows, effective_at=_at(effective)))
        wait_event(subscriber, "price.prepared", version=2, timeout=10)
        assert time.time() < effective
        state = rig.gw.get("/api/v1/prices/state")[1]  # type: ignore[union-attr]
        assert [s["version"] for s in state["scheduled"]] == [2] and state["active_version"] == 1
        # prepared ahead: paper labels printed and marked with their time, tags untouched until then
        wait_for(lambda: rig.floor.paper(down) == (700, 2), 5, what="the v2 paper label printed ahead")
        assert any(f[-2].startswith("valid from ") for f in rig.floor.printed_labels() if f[-1].endswith("v2"))
        assert not [c for _m, c in rig.floor.ap.uploads if '"v2"' in c]
        wait_event(subscriber, "price.confirmed", version=2, timeout=30)
        wait_for(lambda: any(x[2] == up and x[3] == 1300 for x in poll.samples), 5, what="a lookup after the end")
        poll.stop()
        assert not poll.above_shelf(), poll.above_shelf()[:5]
        assert not watch.violations, watch.violations[:5]
        for sku, new in ((down, 700), (paper, 800)):
            early = [x for x in poll.samples if x[2] == sku and x[1] < effective and x[3] != 1000]
            assert not early, f"a lower price was charged before effective_at {effective:.3f}: {early[:3]}"
            assert effective <= poll.first(sku, new) <= effective + 1.0
            assert effective <= _switched(watch, "1", sku, new) <= effective + 1.0  # the till with its own table
        assert poll.before(up, effective) == {1000}
        raised = poll.first(up, 1300)
        assert raised >= effective and rig.floor.tag_price(up) == 1300  # charged once the tag showed it
        assert min(t for t, s, p in watch.shelf_timeline if s == up and p == 1300) <= _switched(watch, "1", up, 1300)
        tag_uploads = [c for _m, c in rig.floor.ap.uploads if '"v2"' in c]
        assert len(tag_uploads) == 2  # pushed at effective_at (no valid-from on a tag)
    finally:
        rig.close()


def test_scheduled_versions_queue_and_a_newer_batch_supersedes_a_scheduled_one(
        tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    rig = Rig(tmp_path, mosquitto, checkin=0.3, prices=SYNCED)
    try:
        rig.start_on_version_1(subscriber, 10, 1000)
        a, b = "SKU000001", "SKU000008"
        # far enough ahead that both are still scheduled when v3 is prepared, also on a loaded machine (preparing
        # both took over 3 s in a parallel test run)
        t2, t3 = _ahead(6.0), _ahead(8.0)
        watch = ShelfWatch(rig.floor, [a, b], valid_from={2: t2 + SWAP, 3: t3 + SWAP})
        poll = LookupPoller(rig, [a, b], watch)
        v2 = items(10, base=1000)
        v2[1]["price"] = 800
        v3 = [dict(r) for r in v2]
        v3[1]["price"], v3[8]["price"] = 600, 1200  # v3 is computed against v2, which is queued before it
        rig.hq.batch(batch(rig.key, 2, v2, effective_at=_at(t2)))
        wait_event(subscriber, "price.prepared", version=2, timeout=10)
        rig.hq.batch(batch(rig.key, 3, v3, effective_at=_at(t3)))
        e = wait_event(subscriber, "price.prepared", version=3, timeout=10)
        assert e["data"]["changed"] == 2
        state = rig.gw.get("/api/v1/prices/state")[1]  # type: ignore[union-attr]
        assert time.time() < t2, "the machine was too slow to see both versions scheduled"
        assert [s["version"] for s in state["scheduled"]] == [2, 3]
        wait_event(subscriber, "price.confirmed", version=3, timeout=30)
        wait_for(lambda: any(x[2] == b and x[3] == 1200 for x in poll.samples), 5, what="a lookup after the end")
        poll.stop()
        assert poll.before(a, t2) == {1000} and t2 <= poll.first(a, 800) <= t2 + 1.0
        assert poll.before(a, t3) <= {1000, 800} and t3 <= poll.first(a, 600) <= t3 + 1.0
        assert poll.before(b, t3) == {1000} and poll.first(b, 1200) >= t3
        assert t3 <= _switched(watch, "1", a, 600) <= t3 + 1.0
        assert not poll.above_shelf(), poll.above_shelf()[:5]
        assert not watch.violations, watch.violations[:5]

        # v4 is scheduled; v5 comes at once: it takes effect before v4, so v4 is aborted (superseded)
        t4 = _ahead(4.0)
        v4 = [dict(r) for r in v3]
        v4[3]["price"] = 500
        rig.hq.batch(batch(rig.key, 4, v4, effective_at=_at(t4)))
        wait_event(subscriber, "price.prepared", version=4, timeout=10)
        v5 = [dict(r) for r in v3]
        v5[4]["price"] = 900
        rig.hq.batch(batch(rig.key, 5, v5))
        e = wait_event(subscriber, "price.aborted", version=4, timeout=15)
        assert "superseded by version 5" in e["data"]["reason"]
        wait_event(subscriber, "price.committed", version=5, timeout=15)
        assert any(m.get("type") == "ABORT" and m.get("version") == 4 for m in rig.floor.tills["1"].received)
        wait_for(lambda: time.time() > t4 + 1.0, 10)
        assert rig.floor.lookup("2", "SKU000003")["price"] == 1000  # type: ignore[index]
        assert rig.floor.tills["1"].charge("SKU000003") == 1000 and 4 not in rig.floor.tills["1"].staged
        wait_event(subscriber, "price.confirmed", version=5, timeout=20)
        assert rig.floor.lookup("2", "SKU000004")["price"] == 900  # type: ignore[index]
        void = [e for e in subscriber.events("store-0042") if e["kind"] == "label" and e["data"].get("void")]
        assert void and void[0]["data"]["version"] == 4  # the labels printed ahead for v4 are to be thrown away
    finally:
        rig.close()


def test_kill9_while_waiting_for_effective_at_still_switches_on_time(
        tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    rig = Rig(tmp_path, mosquitto, checkin=0.3, prices=SYNCED)
    try:
        rig.start_on_version_1(subscriber, 10, 1000)
        effective = _ahead(6.0)
        watch = ShelfWatch(rig.floor, ["SKU000005"], valid_from={2: effective + SWAP})
        rows = items(10, base=1000)
        rows[5]["price"] = 750
        rig.hq.batch(batch(rig.key, 2, rows, effective_at=_at(effective)))
        wait_event(subscriber, "price.prepared", version=2, timeout=10)
        assert rig.gw is not None
        rig.gw.kill9()
        rig.gw = GatewayProcess(rig.config, rig.http_port).start()
        assert time.time() < effective - 1.0, "the restart took too long for this test to mean anything"
        poll = LookupPoller(rig, ["SKU000005"], watch)
        wait_event(subscriber, "price.confirmed", version=2, timeout=30)
        poll.stop()
        assert poll.before("SKU000005", effective) == {1000}
        assert effective <= poll.first("SKU000005", 750) <= effective + 1.0
        assert effective <= _switched(watch, "1", "SKU000005", 750) <= effective + 1.0
        assert not watch.violations and not poll.above_shelf()
    finally:
        rig.close()


def test_a_store_whose_clock_is_not_synchronised_refuses_to_schedule(
        tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    rig = Rig(tmp_path, mosquitto, prices="clock_synchronised = false\n")
    try:
        rig.start()
        rows = items(4, base=100)
        rig.hq.batch(batch(rig.key, 1, rows, effective_at=_at(time.time() + 60)))
        e = wait_event(subscriber, "price.rejected", batch_id="b1", timeout=15)
        assert e["data"]["reason"] == "clock_not_synchronised" and "not known to be synchronised" in e["data"]["detail"]
        state: dict[str, Any] = rig.gw.get("/api/v1/prices/state")[1]  # type: ignore[union-attr]
        assert state["clock"]["synchronised"] is False and state["active_version"] == 0
        assert not price_events(subscriber, "price.prepared")
        rig.hq.batch(batch(rig.key, 1, rows))  # at once: no clock needed
        wait_event(subscriber, "price.committed", version=1, timeout=15)
    finally:
        rig.close()


def test_a_till_back_while_a_change_waits_is_caught_up_and_switches_with_the_others(
        tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    """No lock is held while a batch waits for effective_at: a till that was away is caught up meanwhile, staged
    with the scheduled batch too, and switches on time with the others."""
    rig = Rig(tmp_path, mosquitto, checkin=0.3, prices=SYNCED)
    try:
        rig.start()
        rig.floor.start_tills(["1"])  # till 2 is switched off
        wait_for(lambda: rig.floor.tills["1"].hello_reply, 15, what="till 1 connected")
        rig.hq.batch(batch(rig.key, 1, items(10, base=1000)))
        wait_event(subscriber, "price.confirmed", version=1, timeout=30)
        effective = _ahead(6.0)
        watch = ShelfWatch(rig.floor, ["SKU000005"], valid_from={2: effective + SWAP})
        rows = items(10, base=1000)
        rows[5]["price"] = 650
        rig.hq.batch(batch(rig.key, 2, rows, effective_at=_at(effective)))
        e = wait_event(subscriber, "price.committed", version=1)
        assert e["data"]["devices"]["till-2"] == "excluded"
        wait_event(subscriber, "price.prepared", version=2, timeout=10)
        rig.floor.start_tills(["2"])
        e = wait_event(subscriber, "price.caught_up", device="till-2", timeout=15)
        assert e["data"]["version"] == 1 and time.time() < effective
        assert 2 in rig.floor.tills["2"].staged  # the scheduled batch is staged on it too
        wait_event(subscriber, "price.confirmed", version=2, timeout=30)
        for till in ("1", "2"):
            assert effective <= _switched(watch, till, "SKU000005", 650) <= effective + 1.0
        assert not watch.violations, watch.violations[:5]
    finally:
        rig.close()


def test_a_till_that_fails_its_scheduled_commit_is_retried_before_a_tag_shows_the_decrease(
        tmp_path: Path, mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    """A scheduled change holds no till before effective_at (nothing is charged differently before then), so a
    till that answers its COMMIT with an error still charges the old price: no tag may show the decrease until
    it took the COMMIT (retried every commit_retry)."""
    rig = Rig(tmp_path, mosquitto, checkin=0.2, prices=SYNCED)
    try:
        rig.start_on_version_1(subscriber, 10, 1000)
        down = "SKU000002"
        effective = _ahead(3.0)
        # the paper label printed ahead goes up late (by hand): the tag is what changes first here
        watch = ShelfWatch(rig.floor, [down], valid_from={2: effective + 600})
        rows = items(10, base=1000)
        rows[2]["price"] = 700
        rig.floor.tills["1"].refuse_commits = 5  # ~1.5 s of refusals at commit_retry 0.3 s
        rig.hq.batch(batch(rig.key, 2, rows, effective_at=_at(effective)))
        wait_event(subscriber, "price.confirmed", version=2, timeout=30)
        assert rig.floor.tills["1"].refuse_commits == 0 and rig.floor.tag_price(down) == 700
        assert not watch.violations, watch.violations[:5]
        committed = _switched(watch, "1", down, 700)
        assert committed >= effective + 1.0  # it really refused for a while
        assert min(t for t, s, p in watch.shelf_timeline if s == down and p == 700) >= committed
    finally:
        rig.close()
