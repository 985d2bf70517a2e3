"""Read-only HTTP routes for in-store systems: price checks and the price state.

``GET /api/v1/prices/state`` is the retained report; ``GET /api/v1/prices/{code}`` answers a SKU or GTIN
exactly as a till's LOOKUP would (min(old, new) during a transition), for price-check kiosks and scanners.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from storelink import safe_json

if TYPE_CHECKING:
    from storelink.prices.part import PricesPart


def routes(part: PricesPart) -> web.RouteTableDef:
    table = web.RouteTableDef()

    @table.get("/api/v1/prices/state")
    async def state(_request: web.Request) -> web.Response:
        return web.json_response(await part.state.refresh() if part.ready.is_set() else {"state": "starting"})

    @table.get("/api/v1/prices/{code}")
    async def lookup(request: web.Request) -> web.Response:
        code = request.match_info["code"]
        if not part.ready.is_set():
            return web.json_response({"error": "the price book is starting"}, status=503)
        if not 1 <= len(code) <= 64 or not safe_json.text_ok(code):
            return web.json_response({"error": "a SKU or GTIN is 1..64 characters of UTF-8 text"}, status=400)
        item = await part.book.alookup(code)
        if item is None:
            return web.json_response({"error": f"no price for {safe_json.echo(code)}"}, status=404)
        return web.json_response(item)

    return table


def install_routes(part: PricesPart) -> None:
    def extend(app: web.Application) -> None:
        app.add_routes(routes(part))

    part.gateway.http_extensions.append(extend)
