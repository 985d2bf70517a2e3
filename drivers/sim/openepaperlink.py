"""A fake OpenEPaperLink access point for tests and `storelink demo`: the real HTTP endpoints and answer shapes
(`POST /jsonupload`, `POST /imgupload`, `GET /get_db`, `GET /current/{MAC}.json`), with simulated tags that
check in after a configurable delay (or never), and an AP that can go down and come back (also on its own
after a number of uploads: an AP that dies in the middle of a change), or answer slowly (`slow(seconds)`, ended
for every waiting request at once by `hurry()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import socket
import time

from aiohttp import web


@dataclasses.dataclass
class FakeTag:
    mac: str
    hash: str = "0" * 32
    pending: int = 0
    lastseen: int = 0
    nextcheckin: int = 0
    content: str | None = None
    never_checks_in: bool = False
    checkin_delay: float | None = None  # None: the AP's default
    updates: int = 0

    def record(self) -> dict[str, object]:
        """The fields of the AP's tagDBtoJson that matter here, plus a few constant ones of a real record."""
        return {"mac": self.mac, "hash": self.hash, "lastseen": self.lastseen, "nextupdate": 0,
                "nextcheckin": self.nextcheckin, "pending": self.pending, "alias": "", "contentMode": 19,
                "LQI": 100, "RSSI": -60, "temperature": 21, "batteryMv": 2900, "hwType": 1, "wakeupReason": 0,
                "capabilities": 0, "modecfgjson": "", "isexternal": False, "apip": "0.0.0.0", "rotate": 0,
                "lut": 0, "invert": 0, "updatecount": self.updates, "updatelast": self.lastseen, "ch": 11, "ver": 0}


class FakeAccessPoint:
    def __init__(self, macs: list[str], checkin_delay: float = 0.2, host: str = "127.0.0.1", port: int = 0):
        self.tags = {m: FakeTag(m) for m in macs}
        self.checkin_delay = checkin_delay
        self.host = host
        # bound at once so the port is known (and reserved) before the AP starts answering
        self._sock: socket.socket | None = socket.create_server((host, port))
        self.port = int(self._sock.getsockname()[1])
        self.uploads: list[tuple[str, str]] = []
        self.busy = False  # the AP answers 409 "come back later" while not in its run state
        self.stop_after_uploads: int | None = None  # take this many more uploads, then go away (stop())
        self._delay = 0.0  # seconds every request takes before it is answered
        self._hurry = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_checkin: list[object] = []  # callables(tag) the demo uses to print what a tag now shows

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FakeAccessPoint:
        app = web.Application()
        app.router.add_post("/jsonupload", self._jsonupload)
        app.router.add_post("/imgupload", self._imgupload)
        app.router.add_get("/get_db", self._get_db)
        app.router.add_get("/current/{name}", self._current)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        if self._sock is None or self._sock.fileno() == -1:
            self._sock = socket.create_server((self.host, self.port))
        await web.SockSite(self._runner, self._sock).start()
        return self

    async def stop(self) -> None:
        """The AP goes away (connections refused) until start() again; tags keep their state."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            self._sock.close()

    def slow(self, seconds: float) -> None:
        """Answer every request only after `seconds` (an overloaded ESP32)."""
        self._delay = seconds
        self._hurry.clear()

    def hurry(self) -> None:
        """Answer at once again, also the requests already waiting."""
        self._delay = 0.0
        self._hurry.set()

    async def _wait(self) -> None:
        if self._delay:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._delay):
                    await self._hurry.wait()

    async def close(self) -> None:
        self.hurry()
        await self.stop()
        for t in list(self._tasks):
            t.cancel()

    def _apply(self, mac: str, content: str) -> None:
        tag = self.tags[mac]
        tag.content = content
        tag.hash = hashlib.md5(content.encode()).hexdigest()
        tag.pending += 1
        tag.updates += 1
        delay = self.checkin_delay if tag.checkin_delay is None else tag.checkin_delay
        tag.nextcheckin = int(time.time() + delay)
        if not tag.never_checks_in:
            task = asyncio.get_running_loop().create_task(self._checkin(tag, delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _checkin(self, tag: FakeTag, delay: float) -> None:
        await asyncio.sleep(delay)
        if tag.never_checks_in:
            return
        tag.pending = 0
        tag.lastseen = int(time.time())
        for callback in self.on_checkin:
            callback(tag)  # type: ignore[operator]

    async def _jsonupload(self, request: web.Request) -> web.Response:
        if self.busy:
            return web.Response(status=409, text="come back later")
        form = await request.post()
        mac, content = form.get("mac"), form.get("json")
        if not isinstance(mac, str) or not isinstance(content, str):
            return web.Response(status=400, text="Missing parameters")
        if mac not in self.tags:
            return web.Response(status=400, text="mac not found in tagDB")
        await self._wait()
        self.uploads.append((mac, content))
        self._apply(mac, content)
        if self.stop_after_uploads is not None:
            self.stop_after_uploads -= 1
            if self.stop_after_uploads <= 0:
                self.stop_after_uploads = None
                task = asyncio.get_running_loop().create_task(self.stop())  # after this answer went out
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return web.Response(text="Ok, saved")

    async def _imgupload(self, request: web.Request) -> web.Response:
        if self.busy:
            return web.Response(status=409, text="Come back later")
        form = await request.post()
        mac, image = form.get("mac"), form.get("image") or form.get("file")
        if not isinstance(mac, str) or image is None:
            return web.Response(status=400, text="parameters incomplete")
        if mac not in self.tags:
            return web.Response(status=400, text="mac not found")
        data = image.file.read() if isinstance(image, web.FileField) else str(image).encode()
        self._apply(mac, hashlib.sha256(data).hexdigest())
        return web.Response(text="Ok, saved")

    async def _get_db(self, request: web.Request) -> web.Response:
        await self._wait()
        mac = request.query.get("mac")
        if mac is not None:
            if len(mac) not in (12, 16):
                return web.json_response({"error": "malformatted parameter"})
            tag = self.tags.get(mac.upper() if len(mac) == 16 else "0000" + mac.upper())
            return web.json_response({"tags": [tag.record()] if tag else []})
        # the AP pages its database: about 5000 bytes per answer, "continu" says where the next page starts
        tags = list(self.tags.values())
        start = int(request.query.get("pos", "0"))
        page: list[dict[str, object]] = []
        body: dict[str, object] = {"tags": page}
        for i in range(start, len(tags)):
            page.append(tags[i].record())
            if len(json.dumps(body)) > 5000:
                body["continu"] = i + 1
                break
        return web.json_response(body)

    async def _current(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        tag = self.tags.get(name.removesuffix(".json"))
        if tag is None or tag.content is None or not name.endswith(".json"):
            return web.Response(status=404, text="Not found")
        return web.Response(text=tag.content, content_type="application/json")
