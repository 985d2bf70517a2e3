"""The kiosk's online cart: a signed-in customer's cart or wish list, fetched from head office and printed in the
store as an order slip the stock room picks from.

The kiosk (a browser on a store PC) calls the local HTTP API while a customer stands on its mat:

- ``POST /api/v1/kiosk/{kiosk}/cart`` ``{"customer": "<opaque sign-in token>", "list": "cart"|"wishlist"}``: the
  gateway asks head office over MQTT (``{base}/cart/request`` with an MQTT 5 response topic and correlation
  data, plus ``reply_to``/``correlation_id`` in the JSON for 3.1.1), waits ``[cart] timeout`` seconds, and
  answers 503 at once when the uplink is down, 504 when head office is silent;
- ``POST /api/v1/kiosk/{kiosk}/print``: prints the session's cart on the ``[cart] printer`` (an escpos_printer
  device, its ``print_slip``);
- ``GET /api/v1/kiosk/{kiosk}/events``: server-sent events: ``session`` when a customer steps on, ``clear`` when
  they step off (the kiosk wipes its screen).

The cart lives only in the kiosk session (gateway/kiosk/sessions.py KioskSessions): it is purged when the customer steps
off, an answer arriving after that is dropped, nothing of it is logged or put in the outbox, and the slip carries
items and a pick number, not the customer's name. Head office hears only the anonymous kiosk.session_* events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from aiohttp import web
from pydantic import Field, ValidationError

from storelink import safe_json
from storelink.config import RunningConfig
from storelink.contract import CartAnswer, CartRequest
from storelink.devices.supervisor import DeviceSupervisor
from storelink.downlink import Downlink
from storelink.kiosk.sessions import KioskEvent, KioskSessions
from storelink.outbox import iso_ts
from storelink.parts import BasePart, Subscription
from storelink.uplink import Uplink
from storelink.validation import StrictModel, is_identifier
from storelink.web import sse
from storelink.web.server import BadRequestBody, error, read_json

log = logging.getLogger(__name__)
CART_KEY = "online_cart"


class CartQuery(StrictModel):
    customer: str = Field(min_length=1, max_length=512, description="opaque sign-in token; head office resolves it")
    list: Literal["cart", "wishlist"] = "cart"


@runtime_checkable
class SlipPrinter(Protocol):
    """A receipt printer driver that prints kiosk slips (escpos_printer)."""

    async def print_slip(self, title: str, lines: list[tuple[str, str]], barcode: str | None = None,
                         footer: str = "") -> None: ...


class CartFailed(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass
class _Pending:
    kiosk_id: str
    future: asyncio.Future[CartAnswer]


class KioskCart(BasePart):
    name = "cart"

    def __init__(self, config: RunningConfig, uplink: Uplink, sessions: KioskSessions, devices: DeviceSupervisor):
        self.config = config
        self.uplink = uplink
        self.topics = uplink.topics
        self.sessions = sessions
        self.devices = devices
        sessions.add_listener(self.on_session)
        self._pending: dict[str, _Pending] = {}  # correlation id (hex) -> waiting request
        self._screens: dict[str, set[asyncio.Queue[tuple[str, dict[str, Any]] | None]]] = {}  # None: stream ends
        self.counts = {"requests": 0, "answered": 0, "timeouts": 0, "offline": 0, "printed": 0, "cleared": 0}

    # -- head office round trip --------------------------------------------------------------------------------
    async def fetch(self, kiosk_id: str, query: CartQuery) -> CartAnswer:
        sessions = self.sessions
        if not sessions.active(kiosk_id):
            raise CartFailed(409, "no customer at this kiosk: step on the mat first")
        session_id = sessions.session_id(kiosk_id)
        assert session_id is not None  # active
        self.counts["requests"] += 1
        if not self.uplink.connected:
            self.counts["offline"] += 1
            raise CartFailed(503, "head office cannot be reached right now; online carts are unavailable")
        corr = uuid.uuid4().hex
        fut: asyncio.Future[CartAnswer] = asyncio.get_running_loop().create_future()
        self._pending[corr] = _Pending(kiosk_id, fut)
        request = CartRequest(kiosk=kiosk_id, session=session_id, customer=query.customer, list=query.list,
                              correlation_id=corr, reply_to=self.topics.cart_response, ts=iso_ts(time.time()))
        timeout = self.config.current.cart.timeout
        try:
            self.uplink.publish_direct(self.topics.cart_request, request.model_dump_json().encode(), qos=1,
                                       correlation_data=bytes.fromhex(corr), response_topic=self.topics.cart_response)
            try:
                async with asyncio.timeout(timeout):
                    answer = await fut
            except TimeoutError:
                self.counts["timeouts"] += 1
                raise CartFailed(504, f"head office did not answer within {timeout:g}s") from None
        finally:
            self._pending.pop(corr, None)
        self.counts["answered"] += 1
        if not answer.ok:
            raise CartFailed(404, answer.error or "head office found no such list")
        if not sessions.active(kiosk_id) or sessions.session_id(kiosk_id) != session_id:
            raise CartFailed(409, "the customer left the kiosk")
        sessions.store(kiosk_id, CART_KEY, answer.model_dump(exclude={"correlation_id"}))
        return answer

    async def on_response(self, down: Downlink) -> None:
        corr = down.correlation_data.hex() if down.correlation_data else None
        try:
            answer = CartAnswer.model_validate(safe_json.loads(down.payload))
        except (safe_json.JsonRejected, ValidationError) as err:
            # The payload may hold a customer's cart: log the shape of the problem, not the content.
            problems = f"{err.error_count()} problems" if isinstance(err, ValidationError) else err.reason
            log.warning("cart answer from head office is malformed (%s)", problems)
            if corr and corr in self._pending:
                fut = self._pending[corr].future
                if not fut.done():
                    fut.set_exception(CartFailed(502, "head office sent a malformed answer"))
            return
        pending = self._pending.get(corr or answer.correlation_id or "")
        if pending is None or pending.future.done():
            log.info("cart answer for no waiting request (late, or the customer left): dropped")
            return
        pending.future.set_result(answer)

    # -- printing ----------------------------------------------------------------------------------------------
    async def print_slip(self, kiosk_id: str) -> dict[str, Any]:
        sessions = self.sessions
        cart = sessions.get(kiosk_id, CART_KEY) if sessions.active(kiosk_id) else None
        if not cart:
            raise CartFailed(409, "no cart loaded for the customer at this kiosk")
        printer_id = self.config.current.cart.printer
        if printer_id is None:
            raise CartFailed(503, "no receipt printer configured ([cart] printer)")
        driver = self.devices.driver(printer_id)
        if not isinstance(driver, SlipPrinter):
            raise CartFailed(503, f"receipt printer {printer_id!r} is not running")
        pick = f"{secrets.randbelow(10**6):06d}"
        lines = [(f"{it['qty']} x {it['description'] or it['sku']}"[:40], it["sku"]) for it in cart["items"]]
        lines.append(("Items", str(sum(it["qty"] for it in cart["items"]))))
        try:
            await driver.print_slip(f"ORDER {pick}", lines, barcode=f"PICK{pick}",
                                    footer=f"Pick and bring to {kiosk_id}\n{time.strftime('%H:%M')}")
        except (ConnectionError, OSError, ValueError) as err:
            raise CartFailed(503, f"the receipt printer failed: {err}") from None
        self.counts["printed"] += 1
        return {"printed": True, "pick": pick, "lines": len(cart["items"])}

    # -- the kiosk screen --------------------------------------------------------------------------------------
    async def on_session(self, event: KioskEvent) -> None:
        if event.kind == "ended":
            for corr, pending in list(self._pending.items()):
                if pending.kiosk_id == event.kiosk_id and not pending.future.done():
                    pending.future.set_exception(CartFailed(409, "the customer left the kiosk"))
                    self._pending.pop(corr, None)
            self.counts["cleared"] += 1
            self._tell(event.kiosk_id, "clear", {"reason": event.reason})
        else:
            self._tell(event.kiosk_id, "session", {"state": "started"})

    def _tell(self, kiosk_id: str, name: str, data: dict[str, Any]) -> None:
        for queue in self._screens.get(kiosk_id, set()):
            queue.put_nowait((name, data))

    async def stop(self) -> None:
        """The part stops (the gateway is stopping): end the kiosk screens' streams."""
        for queues in self._screens.values():
            for queue in queues:
                queue.put_nowait(None)

    def status(self) -> dict[str, Any]:
        return {"waiting": len(self._pending), "screens": sum(len(s) for s in self._screens.values()),
                **self.counts}

    # -- what the part adds ------------------------------------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.topics.cart_response, self.on_response)]

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/api/v1/kiosk/{kiosk}/cart", self._post_cart),
                web.post("/api/v1/kiosk/{kiosk}/print", self._post_print),
                web.get("/api/v1/kiosk/{kiosk}/events", self._get_events)]

    @staticmethod
    def _kiosk(request: web.Request) -> str:
        kiosk_id = request.match_info["kiosk"]
        if not is_identifier(kiosk_id):
            raise CartFailed(400, "not a valid kiosk id")
        return kiosk_id

    async def _post_cart(self, request: web.Request) -> web.Response:
        try:
            kiosk_id = self._kiosk(request)
            try:
                query = CartQuery.model_validate(await read_json(request))
            except BadRequestBody as err:
                raise CartFailed(err.status, err.message) from None
            except ValidationError:
                raise CartFailed(422, 'body must be {"customer": "<token>", "list": "cart"|"wishlist"}') from None
            answer = await self.fetch(kiosk_id, query)
        except CartFailed as err:
            return error(err.status, err.message)
        return web.json_response({"list": query.list, "currency": answer.currency,
                                  "items": [i.model_dump() for i in answer.items]})

    async def _post_print(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self.print_slip(self._kiosk(request)))
        except CartFailed as err:
            return error(err.status, err.message)

    async def _get_events(self, request: web.Request) -> web.StreamResponse:
        try:
            kiosk_id = self._kiosk(request)
        except CartFailed as err:
            return error(err.status, err.message)
        return await sse.stream(request, self._screen(kiosk_id))

    async def _screen(self, kiosk_id: str) -> AsyncGenerator[tuple[str, str], None]:
        """What the kiosk's screen hears: its state now, then each session start and end."""
        queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        self._screens.setdefault(kiosk_id, set()).add(queue)
        try:
            yield "session", json.dumps({"state": "started" if self.sessions.active(kiosk_id) else "idle"})
            while (item := await queue.get()) is not None:
                yield item[0], json.dumps(item[1])
        finally:
            self._screens[kiosk_id].discard(queue)

