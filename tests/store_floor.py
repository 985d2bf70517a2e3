"""A simulated shop floor for the price tests: real till simulators over TCP, a fake ESL access point and a fake
ZPL printer, run on their own asyncio loop in a thread so the test (and a real `storelink run` subprocess) can
drive them from plain blocking code.

What the shelf *shows* is modelled as a customer would see it: an ESL tag shows the content it fetched at its
last check-in (not what was uploaded to the AP and is still pending), a paper label the last one printed.
`ShelfWatch` compares what each till would charge (its own table: `TillSimulator.charge`) with the shelf at every
instant either of them changes: on every message a till applies, every tag check-in and every label printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from storelink.drivers.sim.openepaperlink import FakeAccessPoint, FakeTag
from storelink.drivers.sim.till import TillSimulator
from storelink.drivers.sim.zpl_printer import FakeZplCore, FakeZplPrinter

T = TypeVar("T")


def money_to_minor(text: str) -> int:
    m = re.search(r"(\d+)\.(\d{2})", text)
    assert m, f"no amount in {text!r}"
    return int(m.group(1)) * 100 + int(m.group(2))


class StoreFloor:
    def __init__(self, till_ids: list[str], tags: dict[str, str], till_port: int, checkin_delay: float = 0.2,
                 print_seconds: float = 0.0, protocols: dict[str, int] | None = None):
        self.till_ids = till_ids
        self.tag_of = tags  # sku -> mac
        self.till_port = till_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="store-floor", daemon=True)
        self.thread.start()
        self.ap = FakeAccessPoint(list(tags.values()), checkin_delay=checkin_delay)
        self.printer = FakeZplPrinter(FakeZplCore(print_seconds=print_seconds))
        self.shown: dict[str, str | None] = {}  # mac -> content the tag displays
        self.ap.on_checkin.append(self._checked_in)
        self.tills = {t: TillSimulator("127.0.0.1", till_port, t, protocol=(protocols or {}).get(t, 2))
                      for t in till_ids}
        self._keepers: list[asyncio.Future[None]] = []
        self.call(self.ap.start())
        self.call(self.printer.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _checked_in(self, tag: FakeTag) -> None:
        self.shown[tag.mac] = tag.content

    # -- tills --------------------------------------------------------------------------------------------
    def start_tills(self, ids: list[str] | None = None) -> None:
        for t in ids or self.till_ids:
            self._keepers.append(asyncio.run_coroutine_threadsafe(self._keep(self.tills[t]), self.loop))

    async def _keep(self, sim: TillSimulator) -> None:
        """A till that reconnects whenever the gateway goes away (as a real one would)."""
        while True:
            try:
                await sim.connect()
                await sim.closed.wait()
            except (OSError, ConnectionError, TimeoutError, Exception):
                pass
            await sim.close()
            await asyncio.sleep(0.2)

    def stop_tills(self) -> None:
        for k in self._keepers:
            k.cancel()
        self._keepers.clear()
        for sim in self.tills.values():
            with contextlib.suppress(Exception):
                self.call(sim.close())

    def till_versions(self) -> dict[str, int | None]:
        return {t: sim.version for t, sim in self.tills.items()}

    def lookup(self, till: str, sku: str) -> dict[str, Any] | None:
        reply = self.call(self.tills[till].lookup(sku), timeout=15)
        return reply.get("item") if reply.get("type") == "OK" else None

    def till_prices(self, till: str) -> dict[str, int]:
        """The prices the till itself holds (what it committed), by SKU."""
        return {k: int(v["price"]) for k, v in self.tills[till].prices.items()}

    # -- the shelf ----------------------------------------------------------------------------------------
    def tag_price(self, sku: str) -> int | None:
        content = self.shown.get(self.tag_of[sku])
        if not content:
            return None
        return money_to_minor(json.loads(content)[1]["text"][2])

    def tag_version(self, sku: str) -> int | None:
        content = self.shown.get(self.tag_of[sku])
        if not content:
            return None
        return int(json.loads(content)[-1]["text"][2].lstrip("v"))

    def printed_labels(self) -> list[list[str]]:
        return self.printer.core.printed_fields()

    def paper(self, sku: str) -> tuple[int, int] | None:
        """(price, version) of the last label printed for `sku`."""
        found = None
        for fields in self.printed_labels():
            if fields and fields[-1].startswith(sku + " "):
                found = (money_to_minor(fields[1]), int(fields[-1].rsplit("v", 1)[1]))
        return found

    def shelf(self, sku: str) -> list[int]:
        """Every price the shelf shows for `sku` now (its tag and its paper label)."""
        shown = [self.tag_price(sku) if sku in self.tag_of else None, (self.paper(sku) or (None, 0))[0]]
        return [p for p in shown if p is not None]

    def close(self) -> None:
        self.stop_tills()
        with contextlib.suppress(Exception):
            self.call(self.ap.close())
        with contextlib.suppress(Exception):
            self.call(self.printer.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class ShelfWatch:
    """Checks `till charge <= every price the shelf shows` for `skus` at each change of either (on the floor's
    loop, where every change happens), and keeps a timeline of what each till charged. A paper label printed ahead
    of a scheduled change (`valid_from`: version -> unix time) goes on the shelf at that time, not when printed."""

    def __init__(self, floor: StoreFloor, skus: list[str], tills: list[str] | None = None,
                 valid_from: dict[int, float] | None = None):
        self.floor = floor
        self.skus = skus
        self.tills = tills or list(floor.tills)
        self.violations: list[str] = []
        self.checks = 0
        self.timeline: list[tuple[float, str, str, int | None]] = []  # (time, till, sku, charge) when it changed
        self.shelf_timeline: list[tuple[float, str, int]] = []  # (time, sku, lowest price shown) when it changed
        self._last: dict[tuple[str, str], int | None] = {}
        self._shelf: dict[str, int] = {}
        self.valid_from = valid_from or {}
        self._paper: dict[str, list[tuple[int, int]]] = {}  # sku -> (price, version) of each label printed
        floor.call(self._install())

    async def _install(self) -> None:
        for sku in self.skus:
            paper = self.floor.paper(sku)
            if paper is not None:
                self._paper[sku] = [paper]
        for t in self.tills:
            self.floor.tills[t].on_change.append(lambda _sim: self.check("till"))
        self.floor.ap.on_checkin.append(lambda _tag: self.check("tag"))
        self.floor.printer.core.on_print.append(self._printed)
        self.check("start")

    def _printed(self, _fmt: bytes) -> None:
        fields = self.floor.printer.core.printed_fields()[-1]
        if fields:
            sku, version = fields[-1].split(" ")[0], int(fields[-1].rsplit("v", 1)[1])
            self._paper.setdefault(sku, []).append((money_to_minor(fields[1]), version))
        self.check("print")

    def paper(self, sku: str, now: float) -> int | None:
        """The paper label on the shelf: the last one printed that is valid by now."""
        for price, version in reversed(self._paper.get(sku, [])):
            if now >= self.valid_from.get(version, 0.0):
                return price
        return None

    def check(self, why: str) -> None:
        self.checks += 1
        now = time.time()
        for sku in self.skus:
            tag = self.floor.tag_price(sku) if sku in self.floor.tag_of else None
            shown = [p for p in (tag, self.paper(sku, now)) if p is not None]
            if shown and self._shelf.get(sku) != min(shown):
                self._shelf[sku] = min(shown)
                self.shelf_timeline.append((now, sku, min(shown)))
            for t in self.tills:
                charge = self.floor.tills[t].charge(sku)
                if self._last.get((t, sku)) != charge:
                    self._last[(t, sku)] = charge
                    self.timeline.append((now, t, sku, charge))
                if charge is not None and shown and charge > min(shown):
                    self.violations.append(f"{why}: till {t} charges {charge} for {sku}, the shelf shows {shown}")

    def charged(self, till: str, sku: str) -> list[int | None]:
        return [c for _t, tl, s, c in self.timeline if tl == till and s == sku]


def devices_toml(floor: StoreFloor, zpl: bool = True) -> str:
    out = ""
    for t in floor.till_ids:
        out += (f'[[devices]]\nid = "till-{t}"\ndriver = "till_tcp"\nlisten = "127.0.0.1:{floor.till_port}"\n'
                f'till_id = "{t}"\nrequest_timeout = 3\n')
    tags = ", ".join(f'"{sku}" = "{mac}"' for sku, mac in floor.tag_of.items())
    out += (f'[[devices]]\nid = "esl"\ndriver = "openepaperlink"\nurl = "{floor.ap.url}"\npoll_interval = 0.3\n'
            f"tags = {{ {tags} }}\n")
    if zpl:
        out += (f'[[devices]]\nid = "zpl"\ndriver = "zpl_printer"\nhost = "127.0.0.1"\nport = {floor.printer.port}\n'
                "poll_interval = 0.5\nretry_interval = 0.3\nswap_seconds = 1\n")
    return out
