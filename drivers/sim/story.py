"""The story `storelink demo` tells, one readable line per step, in order, round after round:

1. a till sale reaching head office;  2. a scan, and a garbled one rejected;  3. a price change prepared on the
till, the paper labels and the ESL tags, the till charging min(old, new) while labels confirm, then the new price;
4. a kiosk customer's online cart printed on the receipt printer and purged when they step off the mat;
5. the broker going away, sales kept in the outbox, and the backlog draining when it returns.

Each step acts through a real interface (the till protocol, the scanner's pty, the mat's pin, the HTTP API) and
waits for the evidence a person would look for (what head office received over MQTT, what a fake printer printed,
what a tag shows, `gateway.status()`), then says what happened. A step whose evidence does not come in time says
so and the story goes on. Head office's raw messages are printed only with --verbose (demo_hq.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import ClientSession

from storelink.drivers.sim import input_demo, labels_demo, till_demo
from storelink.drivers.sim.demo_broker import BrokerError, DemoBroker
from storelink.drivers.sim.demo_hq import DemoHeadOffice
from storelink.drivers.sim.openepaperlink import FakeTag
from storelink.drivers.sim.prices_demo import DEMO_ITEMS, PRICE_SWINGS, swing

KIOSK = "kiosk-1"
CUSTOMER = "demo-signin-7f3a"  # an opaque sign-in token: head office resolves it, the store never sees a name


class StepMissed(Exception):
    """What a step waited for did not happen in time."""


def eur(minor: int | None) -> str:
    return "-" if minor is None else f"{minor / 100:.2f}"


class Story:
    def __init__(self, gateway: Any, base_url: str, hq: DemoHeadOffice, broker: DemoBroker,
                 say: Callable[[str], None]):
        self.gateway = gateway  # only gateway.status() is read: what the status API serves
        self.base_url = base_url
        self.hq = hq
        self.broker = broker
        self.say = say
        self.step = 0
        self.checkins: list[tuple[str, str | None]] = []  # (tag MAC, what it shows) at each check-in, in order
        _zpl, ap, _escpos = labels_demo.peers()
        ap.on_checkin.append(self._checked_in)

    def _checked_in(self, tag: FakeTag) -> None:
        self.checkins.append((tag.mac, tag.content))

    def line(self, text: str) -> None:
        self.step += 1
        self.say(f"  {self.step:>2}. {text}")

    # -- waiting for evidence ------------------------------------------------------------------------------------
    async def until(self, what: str, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (value := predicate()):
            if loop.time() > deadline:
                raise StepMissed(f"{what}: not seen within {timeout:g} s")
            await asyncio.sleep(0.05)
        return value

    async def event(self, kind: str, since: int, what: str, timeout: float = 20.0, **match: Any) -> dict[str, Any]:
        """The first `kind` event head office received after message `since` whose data has `match`."""
        def found() -> dict[str, Any] | None:
            return next((e for e in self.hq.events(since, kind)
                         if all((e.get("data") or {}).get(k) == v for k, v in match.items())), None)

        event: dict[str, Any] = await self.until(what, found, timeout)
        return event

    @staticmethod
    def printed(version: int) -> list[list[str]]:
        """The texts of each shelf label labels-1 printed for `version` (its last line is "SKU  vN")."""
        return [f for f in labels_demo.peers()[0].core.printed_fields() if f and f[-1].endswith(f" v{version}")]

    def shows(self, mac: str, version: int) -> str | None:
        """What the tag showed at its last check-in, if that is `version`'s content."""
        return next((c for m, c in reversed(self.checkins) if m == mac and c and f'"v{version}"' in c), None)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.gateway.status()
        return status

    # -- the story ----------------------------------------------------------------------------------------------
    async def set_up(self) -> None:
        """Before round 1: every device up and the store's first price list on the till and the shelf."""
        try:
            await self._set_up()
        except (StepMissed, TimeoutError) as err:
            self.say(f"   !  setting the store up: {err or 'the till did not connect'}; the story starts anyway "
                     "(the gateway's log has the details)")

    async def _set_up(self) -> None:
        await till_demo.connected(30)
        await self.until("every demo device working", lambda: all(
            d["state"] == "ok" for d in self.status()["devices"]), 30)
        if (self.status().get("prices") or {}).get("active_version"):
            return
        since = self.hq.count()
        self.hq.publish_prices(1, DEMO_ITEMS, "demo-v1")
        await self.event("price.confirmed", since, "the first price list on every label", 40, version=1)
        self.say(f"The store is set up: price list version 1 ({len(DEMO_ITEMS)} items) is on the till, the shelf "
                 "labels and the ESL tags.")

    async def round(self) -> None:
        self.step = 0
        for act in (self.a_sale, self.scans, self.a_price_change, self.a_kiosk_customer, self.an_outage):
            try:
                await act()
            except StepMissed as err:
                self.say(f"   !  {err}; the story goes on (the gateway's log has the details)")

    async def a_sale(self) -> None:
        since = self.hq.count()
        sale, reply = await till_demo.sell()
        self.line(f"till-1 rings up sale {sale['sale_id']} ({len(sale['lines'])} lines, {eur(sale['total'])} EUR) "
                  f"-> on disk in the outbox (seq {reply.get('seq')}) before the till hears OK")
        await self.event("sale", since, "the sale at head office", sale_id=sale["sale_id"])
        self.line(f"head office received sale {sale['sale_id']} from till-1")

    async def scans(self) -> None:
        since = self.hq.count()
        input_demo.scan("EAN-13")
        good = await self.event("scan", since, "the scan at head office", valid=True)
        self.line(f"scanner-1 reads an EAN-13 -> good scan of GTIN {good['data'].get('gtin')}, sent to head office")
        since = self.hq.count()
        input_demo.scan("garbled")
        bad = (await self.event("scan", since, "the garbled scan's rejection", valid=False))["data"]
        self.line(f"scanner-1 reads a garbled code -> rejected ({bad.get('reason')}: {bad.get('detail')}); head "
                  "office sees the misread, not the noise")

    async def a_price_change(self) -> None:
        items = {i["sku"]: i for i in DEMO_ITEMS}
        before = {sku: await till_demo.lookup(sku) for sku in PRICE_SWINGS}
        old = {sku: (item or {}).get("regular_price") for sku, item in before.items()}
        new = {sku: swing(sku, old[sku]) for sku in PRICE_SWINGS}
        version = int((self.status().get("prices") or {}).get("active_version") or 0) + 1
        rows = [{**items[sku], "price": new[sku], "unit_price": new[sku]} for sku in PRICE_SWINGS]
        since = self.hq.count()
        self.hq.publish_prices(version, rows, f"demo-v{version}")
        self.line(f"head office publishes price change v{version}: " + ", ".join(
            f"{sku} {items[sku]['description']} {eur(old[sku])} -> {eur(new[sku])} "
            f"({'up' if new[sku] > (old[sku] or 0) else 'down'})" for sku in PRICE_SWINGS))
        prepared = await self.event("price.prepared", since, "the change prepared everywhere", version=version)
        self.line(f"prepared on {', '.join(prepared['data'].get('targets') or [])}: the till has it staged, labels "
                  "and tags are on their way")
        await self.event("price.committed", since, "the commit", version=version)
        during = {sku: await till_demo.lookup(sku) for sku in PRICE_SWINGS}
        try:  # what the status page shows meanwhile (counted once the labels start to confirm)
            left = await self.until("", lambda: next((t.get("labels_left") for t in (
                self.status().get("prices") or {}).get("transition") or [] if t.get("version") == version), None), 2)
        except StepMissed:
            left = None
        self.line("committed; until every label confirms, till-1 charges " + ", ".join(
            f"{sku} {eur((during[sku] or {}).get('price'))}" for sku in PRICE_SWINGS)
            + ": the lower of old and new" + (f" (page: {left} labels left)" if left else ""))
        mine = await self.until("the paper labels", lambda: (
            labels if len(labels := self.printed(version)) >= len(PRICE_SWINGS) else None))
        self.line(f"labels-1 printed {len(mine)} shelf labels: " + "; ".join(f"{f[0]} {f[1]}" for f in mine))
        for n, sku in enumerate(PRICE_SWINGS, 1):
            mac = labels_demo.DEMO_TAGS[sku]
            shown = await self.until(f"ESL tag {mac} showing v{version}", partial(self.shows, mac, version))
            texts = [e["text"][2] for e in json.loads(shown) if "text" in e]
            self.line(f"ESL tag ...{mac[-4:]} checked in: {texts[0]} {texts[1]} ({n} of {len(PRICE_SWINGS)})")
        await self.event("price.confirmed", since, "every label confirmed", 30, version=version)
        after = {sku: await till_demo.lookup(sku) for sku in PRICE_SWINGS}
        self.line(f"every label shows v{version}: till-1 now charges the new prices, " + " and ".join(
            f"{sku} {eur((after[sku] or {}).get('price'))}" for sku in PRICE_SWINGS))

    async def a_kiosk_customer(self) -> None:
        escpos = labels_demo.peers()[2]
        since = self.hq.count()
        input_demo.step_on()
        await self.event("kiosk.session_started", since, "the kiosk session")
        self.line(f"{KIOSK}: a customer steps on the mat -> a session starts (head office hears of it, anonymously)")
        base = f"{self.base_url}/api/v1/kiosk/{KIOSK}"
        async with ClientSession() as http:
            async with http.post(f"{base}/cart", json={"customer": CUSTOMER}) as resp:
                cart = await resp.json()
            if resp.status != 200:
                raise StepMissed(f"the online cart: {resp.status} {cart.get('error')}")
            self.line(f"{KIOSK}: they sign in; head office sends their online cart over MQTT: "
                      + ", ".join(f"{i['qty']} x {i['description']}" for i in cart["items"]))
            jobs = len(escpos.jobs)
            async with http.post(f"{base}/print") as resp:
                slip = await resp.json()
            if resp.status != 200:
                raise StepMissed(f"the order slip: {resp.status} {slip.get('error')}")
            await self.until("the slip on the receipt printer", lambda: len(escpos.jobs) > jobs)
            self.line(f"slips-1 printed the order slip for the stock room (pick number {slip['pick']}, "
                      f"{slip['lines']} items)")
            since = self.hq.count()
            input_demo.step_off()
            ended = await self.event("kiosk.session_ended", since, "the end of the session")
            async with http.post(f"{base}/print") as resp:
                again = await resp.json()
        purged = resp.status == 409
        self.line(f"{KIOSK}: the customer steps off -> session ended ({ended['data'].get('reason')}), "
                  + (f"cart purged (print again: \"{again.get('error')}\")" if purged
                     else f"the cart was NOT purged (print answered {resp.status})"))

    async def an_outage(self) -> None:
        await asyncio.to_thread(self.broker.stop)
        await self.until("the gateway noticing", lambda: not self.status()["uplink"]["connected"], 20)
        self.line(f"the broker goes away ({self.broker.address} stopped): head office is unreachable, the store "
                  "keeps working")
        sales = [(await till_demo.sell())[0] for _ in range(2)]
        waiting = self.status()["outbox"]["depth"]
        self.line(f"till-1 rings up {len(sales)} sales meanwhile -> kept in the outbox: {waiting} events waiting "
                  "(on the status page too)")
        await asyncio.sleep(3)  # a moment for anyone watching the page to see the store offline
        since = self.hq.count()
        try:
            await asyncio.to_thread(self.broker.start)
        except BrokerError as err:
            raise StepMissed(f"the broker could not start again: {err}") from None
        await self.until("the backlog delivered", lambda: (s := self.status())["uplink"]["connected"]
                         and s["outbox"]["depth"] == 0, 30)
        wanted = [s["sale_id"] for s in sales]

        def arrived() -> list[str] | None:
            ids = [i for e in self.hq.events(since, "sale") if (i := e["data"].get("sale_id")) in wanted]
            return ids if set(wanted) <= set(ids) else None

        got = await self.until("the sales at head office", arrived)
        self.line(f"the broker is back: the gateway delivers the {waiting} waiting events; head office has both "
                  f"sales{', in order' if got == wanted else ' (OUT OF ORDER)'}")



class Notices:
    """What head office's own commands (the ones the demo printed) did to the store: one line each."""

    def __init__(self, hq: DemoHeadOffice):
        self.hq = hq
        self.read = hq.count()
        self.configs: set[int] = set()

    def lines(self) -> list[str]:
        messages = self.hq.since(self.read)
        self.read += len(messages)
        out = []
        for topic, body in messages:
            data = body.get("data") if "/events/" in topic else None
            data = data if isinstance(data, dict) else {}
            if topic.endswith("/config/reported"):
                version = body.get("version")
                if isinstance(version, int) and version not in self.configs:  # (retained: again on reconnect)
                    self.configs.add(version)
                    out.append(f"   *  head office pushed config version {version}: the store says "
                               f"{body.get('status')}")
            elif not data or str(data.get("batch_id") or "").startswith("demo-"):
                continue
            elif body.get("kind") == "price.committed":
                out.append(f"   *  head office's price change v{data.get('version')} committed "
                           f"({data.get('changed')} SKU(s) changed)")
            elif body.get("kind") == "price.rejected":
                out.append(f"   *  head office's price change was rejected: {data.get('reason')}: "
                           f"{data.get('detail')}")
        return out
