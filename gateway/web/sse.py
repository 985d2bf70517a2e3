"""Server-sent events: the one way the gateway streams to a browser (the status page, the kiosk screen).

aiohttp-sse does the wire format, the keep-alive pings and the send timeout for a client that stopped reading.
A client that goes away ends the stream; cancellation (the gateway stopping) is never swallowed, so the server
can shut down while streams are open.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from aiohttp import web
from aiohttp_sse import sse_response

KEEPALIVE = 15.0  # seconds between keep-alive comments while nothing is sent


async def stream(request: web.Request, events: AsyncGenerator[tuple[str, str], None]) -> web.StreamResponse:
    """Send each ``(event name, data)`` from ``events`` until it ends or the client disconnects."""
    async with sse_response(request, ping_interval=KEEPALIVE) as resp, contextlib.aclosing(events) as source:
        try:
            async for name, data in source:
                await resp.send(data, event=name)
        except ConnectionResetError:
            pass  # the client went away: nothing left to do
    return resp
