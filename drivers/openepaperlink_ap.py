"""The HTTP API of an OpenEPaperLink access point, as the `openepaperlink` driver uses it.

`GET /get_db` (one tag by `mac`, or every tag in pages: `pos` and `continu`), `POST /jsonupload` (`mac`, `json`:
drawing commands the AP renders for the tag) and `GET /current/{MAC}.json` (what the AP holds for a tag). At most
`max_parallel` requests are in flight: the AP is an ESP32.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp

from storelink.drivers.base import plain_error


class AccessPointError(ConnectionError):
    """The AP is unreachable, answered with an error status, or sent something that is not a tag record."""


class AccessPoint:
    def __init__(self, url: str, request_timeout: float, max_parallel: int):
        self.url = url
        self.request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        self._limit = asyncio.Semaphore(max_parallel)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.request_timeout))
        return self._session

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, str]:
        async with self._limit:
            try:
                async with self.session().request(method, self.url + path, **kw) as resp:
                    return resp.status, await resp.text()
            except (aiohttp.ClientError, TimeoutError, OSError) as err:
                raise AccessPointError(f"access point {self.url} unreachable: {plain_error(err)}") from err

    async def get_tag(self, mac: str) -> dict[str, Any]:
        status, text = await self.request("GET", "/get_db", params={"mac": mac})
        records = self._tag_records(status, text, f"get_db?mac={mac}")
        if not records:
            raise AccessPointError(f"tag {mac} is not known to the access point")
        return records[0]

    async def all_tags(self) -> dict[str, dict[str, Any]]:
        """Every tag record, following the AP's paging (`pos` and `continu`)."""
        out: dict[str, dict[str, Any]] = {}
        pos: int | None = 0
        while pos is not None:
            status, text = await self.request("GET", "/get_db", params={"pos": str(pos)} if pos else None)
            body = self._json(status, text, "get_db")
            for rec in self._tag_records(status, text, "get_db"):
                out[rec["mac"]] = rec
            nxt = body.get("continu")
            pos = int(nxt) if isinstance(nxt, int) and nxt > pos else None
        return out

    def _json(self, status: int, text: str, what: str) -> dict[str, Any]:
        if status != 200:
            raise AccessPointError(f"{what}: HTTP {status} {text[:100]!r}")
        try:
            body = json.loads(text)
        except ValueError as err:
            raise AccessPointError(f"{what}: not JSON: {text[:100]!r}") from err
        if not isinstance(body, dict) or "error" in body:
            raise AccessPointError(f"{what}: {str(body)[:100]}")
        return body

    def _tag_records(self, status: int, text: str, what: str) -> list[dict[str, Any]]:
        tags = self._json(status, text, what).get("tags")
        if not isinstance(tags, list):
            raise AccessPointError(f"{what}: no tag list in the answer")
        for rec in tags:
            if not (isinstance(rec, dict) and isinstance(rec.get("mac"), str) and isinstance(rec.get("hash"), str)
                    and isinstance(rec.get("pending"), int)):
                raise AccessPointError(f"{what}: malformed tag record {str(rec)[:100]}")
        return tags

    async def upload(self, mac: str, content: str) -> None:
        status, text = await self.request("POST", "/jsonupload", data={"mac": mac, "json": content})
        if status != 200:
            raise AccessPointError(f"jsonupload to {mac}: HTTP {status} {text.strip()[:100]!r}")

    async def current_content(self, mac: str) -> str | None:
        """What the AP holds for a tag this gateway never wrote (the AP serves /current/{MAC}.json)."""
        with contextlib.suppress(AccessPointError):
            status, text = await self.request("GET", f"/current/{mac}.json")
            if status == 200 and text.strip().startswith("["):
                return text
        return None
