"""The local status page for the store manager: one read-only page, live over server-sent events.

``GET /`` serves plain files from gateway/web (no build step). ``GET /api/v1/stream`` sends the page's view of the
status as an SSE ``status`` event whenever it changes (checked every ``TICK`` seconds; storelink.web.sse keeps
the stream alive in between), so a phone on the shop floor sees the uplink drop within a second or two.
Actions (reprint labels, ask for prices again, restart a device) go through ``POST /api/v1/actions/{command}``
behind the ``http.token`` bearer token and run the same code as the MQTT commands.

Recent events show kind, device and time only, never the event data (it may hold customer data).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from storelink import safe_json
from storelink.config import RunningConfig
from storelink.outbox import AcceptedEvent, Outbox, iso_ts
from storelink.parts import BasePart
from storelink.remote.commands import CommandError, Commands
from storelink.system.logs import loggable_id
from storelink.web import sse
from storelink.web.server import error, read_json, require_token

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).parent
TICK = 0.5
RECENT = 30
STATIC = {"app.js": "text/javascript", "dom.js": "text/javascript", "style.css": "text/css", "page.html": "text/html"}
ACTION_STATUS = {"unknown_command": 404, "bad_args": 422, "bad_request": 400, "unavailable": 409, "failed": 502}


class RecentEvents:
    """The last events accepted into the outbox: kind, device, time. The data is never kept here."""

    def __init__(self) -> None:
        self.items: deque[dict[str, str]] = deque(maxlen=RECENT)

    def hear(self, events: Sequence[AcceptedEvent]) -> None:
        """The outbox's listener hook: every accepted event (drivers, parts and the ingest API all end there)."""
        for e in events:
            self.items.append({"kind": e.kind, "device": e.device, "ts": iso_ts(e.ts), "seq": str(e.seq)})

    def latest(self) -> list[dict[str, str]]:
        return list(reversed(self.items))


async def get_page(_request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "page.html", headers={"Cache-Control": "no-cache"})


async def get_static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.FileResponse(WEB_DIR / name, headers={"Content-Type": STATIC[name], "Cache-Control": "no-cache"})


class StatusPage(BasePart):
    name = "status_page"

    def __init__(self, config: RunningConfig, status: Callable[[], dict[str, Any]], outbox: Outbox,
                 commands: Commands):
        self.config = config
        self._status = status
        self.commands = commands
        self.recent = RecentEvents()
        outbox.add_listener(self.recent.hear)
        self._closing = asyncio.Event()  # ends the open streams when the part stops (the gateway is stopping)

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", get_page), web.get("/static/{name}", get_static),
                web.get("/api/v1/stream", self._stream), web.get("/api/v1/page", self._page_json),
                web.post("/api/v1/actions/{name}", self._action)]

    async def start(self) -> None:
        self._closing.clear()

    async def stop(self) -> None:
        self._closing.set()

    def page_view(self) -> dict[str, Any]:
        """What the page shows: the status document plus recent events; the same shape as GET /api/v1/status."""
        status = self._status()
        status["recent_events"] = self.recent.latest()
        status["actions_enabled"] = bool(self.config.current.http.token)
        status["actions"] = {name: cmd.help for name, cmd in self.commands.table.items() if cmd.changes_something}
        return status

    async def _views(self) -> AsyncGenerator[tuple[str, str], None]:
        last = ""
        while not self._closing.is_set():
            view = self.page_view()
            view.pop("uptime_s", None)  # changes every tick; the page counts it itself
            text = json.dumps(view, separators=(",", ":"), default=str)
            if text != last:
                yield "status", text
                last = text
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._closing.wait()

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        return await sse.stream(request, self._views())

    async def _page_json(self, _request: web.Request) -> web.Response:
        return web.json_response(self.page_view(), dumps=lambda o: json.dumps(o, default=str))

    async def _action(self, request: web.Request) -> web.Response:
        denied = require_token(request)
        if denied is not None:
            return denied
        name = request.match_info["name"]
        cmd = self.commands.table.get(name)
        if cmd is not None and not cmd.changes_something:
            return error(405, f"{safe_json.echo(name)} is not an action; read GET /api/v1/status")
        body = await read_json(request) if request.can_read_body else {}
        args = body.get("args", {}) if isinstance(body, dict) else body
        try:
            result = await self.commands.execute(name, args)
        except CommandError as err:
            log.warning("action %s refused: %s", loggable_id(name), err.code)
            return error(ACTION_STATUS.get(err.code, 400), err.message, code=err.code)
        log.info("action %s done from the status page", loggable_id(name))
        return web.json_response({"ok": True, "command": name, "result": result})
