"""The local status page for the store manager: one read-only page, live over server-sent events.

``GET /`` serves plain files from gateway/web (no build step). ``GET /api/v1/stream`` sends the page's view of the
status as an SSE ``status`` event whenever it changes (checked every ``TICK`` seconds, with a keep-alive comment
in between), so a phone on the shop floor sees the uplink drop within a second or two. Actions (reprint labels,
ask for prices again, restart a device) go through ``POST /api/v1/actions/{command}`` behind the ``http.token``
bearer token and run the same code as the MQTT commands.

Recent events show kind, device and time only, never the event data (it may hold customer data).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from storelink.outbox import Accepted, iso_ts
from storelink.web.server import error, require_token

if TYPE_CHECKING:
    from storelink.app import Gateway
    from storelink.remote.commands import Commands

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).parent
TICK = 0.5
KEEPALIVE = 15.0
RECENT = 30
STATIC = {"app.js": "text/javascript", "dom.js": "text/javascript", "style.css": "text/css", "page.html": "text/html"}
ACTION_STATUS = {"unknown_command": 404, "bad_args": 422, "bad_request": 400, "unavailable": 409, "failed": 502}


class RecentEvents:
    """The last events accepted into the outbox: kind, device, time. The data is never kept here."""

    def __init__(self, gateway: Gateway):
        self.items: deque[dict[str, str]] = deque(maxlen=RECENT)
        outbox = gateway.outbox
        put_many = outbox.put_many

        # The outbox has no listener hook; wrapping this one instance's put_many sees every accepted event
        # (drivers, parts and the ingest API all end there) without touching the outbox's durable path.
        async def tapped(items: Sequence[tuple[str, str, Any]]) -> list[Accepted]:
            accepted = await put_many(items)
            now = iso_ts(time.time())
            for (kind, device, _data), acc in zip(items, accepted, strict=False):
                self.items.append({"kind": kind, "device": device, "ts": now, "seq": str(acc.seq)})
            return accepted

        outbox.put_many = tapped  # type: ignore[method-assign]

    def latest(self) -> list[dict[str, str]]:
        return list(reversed(self.items))


def page_view(gateway: Gateway, recent: RecentEvents) -> dict[str, Any]:
    """What the page shows: the status document plus recent events; the same shape as GET /api/v1/status."""
    status = gateway.status()
    status["recent_events"] = recent.latest()
    status["actions_enabled"] = bool(gateway.config.http.token)
    commands: Commands | None = gateway.services.get("commands")
    status["actions"] = (
        {name: cmd.help for name, cmd in commands.table.items() if cmd.changes_something} if commands else {}
    )
    return status


async def get_page(_request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "page.html", headers={"Cache-Control": "no-cache"})


async def get_static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.FileResponse(WEB_DIR / name, headers={"Content-Type": STATIC[name], "Cache-Control": "no-cache"})


def install_routes(gateway: Gateway, recent: RecentEvents) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        last, last_sent = "", time.monotonic()
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            while True:
                view = page_view(gateway, recent)
                view.pop("uptime_s", None)  # changes every tick; the page counts it itself
                text = json.dumps(view, separators=(",", ":"), default=str)
                if text != last:
                    await resp.write(f"event: status\ndata: {text}\n\n".encode())
                    last, last_sent = text, time.monotonic()
                elif time.monotonic() - last_sent > KEEPALIVE:
                    await resp.write(b": keep-alive\n\n")
                    last_sent = time.monotonic()
                await asyncio.sleep(TICK)
        return resp

    async def action(request: web.Request) -> web.Response:
        from storelink.remote.commands import CommandError

        denied = require_token(request)
        if denied is not None:
            return denied
        commands: Commands | None = gateway.services.get("commands")
        name = request.match_info["name"]
        if commands is None:
            return error(503, "commands are not installed")
        cmd = commands.table.get(name)
        if cmd is not None and not cmd.changes_something:
            return error(405, f"{name} is not an action; read GET /api/v1/status")
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError as err:
            return error(400, f"body is not valid JSON: {err}")
        args = body.get("args", {}) if isinstance(body, dict) else body
        try:
            result = await commands.run(name, args)
        except CommandError as err:
            log.warning("action %s refused: %s", name, err.message)
            return error(ACTION_STATUS.get(err.code, 400), err.message, code=err.code)
        log.info("action %s done from the status page", name)
        return web.json_response({"ok": True, "command": name, "result": result})

    async def page_json(request: web.Request) -> web.Response:
        return web.json_response(page_view(gateway, recent), dumps=lambda o: json.dumps(o, default=str))

    def extend(app: web.Application) -> None:
        app.router.add_get("/", get_page)
        app.router.add_get("/static/{name}", get_static)
        app.router.add_get("/api/v1/stream", stream)
        app.router.add_get("/api/v1/page", page_json)
        app.router.add_post("/api/v1/actions/{name}", action)

    gateway.http_extensions.append(extend)


def install(gateway: Gateway) -> None:
    from storelink.web.metrics import install_metrics

    recent = RecentEvents(gateway)
    gateway.services["recent_events"] = recent
    install_routes(gateway, recent)
    install_metrics(gateway)
