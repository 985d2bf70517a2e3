"""Read-only HTTP routes for in-store systems: price checks and the price state.

``GET /api/v1/prices/state`` is the retained report; ``GET /api/v1/prices/{code}`` answers a SKU or GTIN
exactly as a till's LOOKUP would (min(old, new) during a transition), for price-check kiosks and scanners.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from storelink import safe_json
from storelink.prices.book import PriceBook
from storelink.prices.state import StatePublisher


def routes(book: PriceBook, state_report: StatePublisher, ready: asyncio.Event) -> list[web.RouteDef]:
    async def state(_request: web.Request) -> web.Response:
        # built fresh, never published from here: a GET must not send a retained message
        return web.json_response(await state_report.current() if ready.is_set() else {"state": "starting"})

    async def lookup(request: web.Request) -> web.Response:
        code = request.match_info["code"]
        if not ready.is_set():
            return web.json_response({"error": "the price book is starting"}, status=503)
        if not 1 <= len(code) <= 64 or not safe_json.text_ok(code):
            return web.json_response({"error": "a SKU or GTIN is 1..64 characters of UTF-8 text"}, status=400)
        item = await book.alookup(code)
        if item is None:
            return web.json_response({"error": f"no price for {safe_json.echo(code)}"}, status=404)
        return web.json_response(item)

    # the part's routes answer 503 while it is not running (storelink.parts); `ready` covers its start-up
    return [web.get("/api/v1/prices/state", state), web.get("/api/v1/prices/{code}", lookup)]
