"""`openepaperlink`: electronic shelf labels behind an OpenEPaperLink access point, over its HTTP API.

Content goes to a tag with `POST /jsonupload` (form fields `mac` and `json`: a list of drawing commands the AP
renders for the tag); `GET /get_db?mac=` returns the tag record with `hash` (MD5 of the rendered content) and
`pending` (queued updates the tag has not fetched yet). Tags sleep and check in about every 40 s, so a push is
confirmed only when the tag's `pending` is back to 0 and its `hash` differs from the hash before the push.
There is no staged "switch now" in OpenEPaperLink: the price coordinator has to wait for these confirmations.

As a LabelPriceTarget (price_role "label"): prepare pushes new content to the tags of the changed items (items
without a tag are skipped); a scheduled change (OpenEPaperLink has no valid-from) is only checked and rendered
ahead and pushed at commit. confirmed(v) is true once every tag of v confirmed; abort pushes the content each
tag showed before (retried by the driver's loop until the AP takes it; restored once the tag shows it);
label_states / restored say per item what each tag is known to show; reprint pushes the content in force again
(retried until the tag fetched it). `tag_states()` reads every tag's current hash for the reconciliation audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from storelink.drivers.base import (
    DeviceConfig,
    DeviceContext,
    Driver,
    Health,
    LabelShows,
    PrepareFailed,
    PriceChange,
    PriceItem,
)
from storelink.drivers.esl_state import EslState, Push
from storelink.drivers.openepaperlink_ap import AccessPoint, AccessPointError
from storelink.drivers.price_text import format_money, unit_price_text
from storelink.validation import StrictModel

log = logging.getLogger(__name__)
_MAC = re.compile(r"^(?:[0-9A-F]{12}|[0-9A-F]{16})$")


def normalize_mac(mac: str) -> str:
    """The AP's own spelling: 16 upper-case hex digits (a 6-byte MAC gets the two zero bytes the AP adds)."""
    m = mac.replace(":", "").replace("-", "").strip().upper()
    if not _MAC.match(m):
        raise ValueError(f"{mac!r} is not a tag MAC (12 or 16 hex digits)")
    return m if len(m) == 16 else "0000" + m


def read_tags_file(path: Path) -> dict[str, str]:
    """`sku,mac` lines (a header line and # comments allowed) -> {sku: mac}. ValueError names the line."""
    out: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as err:  # check-config names the file, no traceback
        raise ValueError(f"cannot read tags_file {path}: {(err.strerror or str(err)).lower()}") from None
    except UnicodeDecodeError:
        raise ValueError(f"tags_file {path} is not UTF-8 text") from None
    for n, row in enumerate(rows, 1):
        if not row or row[0].lstrip().startswith("#") or (n == 1 and row[0].strip().lower() == "sku"):
            continue
        if len(row) != 2 or not row[0].strip():
            raise ValueError(f"{path}:{n}: expected 'sku,mac', got {','.join(row)!r}")
        try:
            out[row[0].strip()] = normalize_mac(row[1])
        except ValueError as err:
            raise ValueError(f"{path}:{n}: {err}") from err
    return out


class TagLayout(StrictModel):
    """Where the texts go on the tag (pixels) and which of the AP's fonts they use."""

    width: int = Field(296, ge=64, le=1600)
    height: int = Field(128, ge=32, le=1200)
    font_name: str = "fonts/bahnschrift20"
    font_price: str = "fonts/bahnschrift70"
    font_small: str = "fonts/bahnschrift20"
    name_chars: int = Field(26, ge=4, le=200, description="longer product names are cut with an ellipsis")
    color: str = "black"


class OpenEPaperLinkConfig(DeviceConfig):
    driver: Literal["openepaperlink"] = "openepaperlink"
    url: str = Field(description="the access point, for example http://192.168.1.50")
    tags: dict[str, str] = Field(default_factory=dict, description="SKU -> tag MAC")
    tags_file: Path | None = Field(None, description="CSV of sku,mac lines, merged with `tags`")
    layout: TagLayout = Field(default_factory=TagLayout)  # type: ignore[arg-type]
    request_timeout: float = Field(5.0, gt=0, le=120)
    poll_interval: float = Field(10.0, gt=0, le=3600, description="seconds between AP checks")
    stale_after: float = Field(600.0, gt=0, description="a tag unconfirmed this long makes the device degraded")
    max_parallel: int = Field(4, ge=1, le=64, description="requests in flight to the AP (an ESP32: keep it low)")
    state_path: Path | None = Field(None, description="default esl-{id}.db beside the gateway database")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"url must be http://host[:port], got {v!r}")
        return v.rstrip("/")

    @field_validator("tags")
    @classmethod
    def _macs(cls, v: dict[str, str]) -> dict[str, str]:
        return {sku: normalize_mac(mac) for sku, mac in v.items()}

    @model_validator(mode="after")
    def _one_tag_per_mac(self) -> OpenEPaperLinkConfig:
        macs = list(self.tag_map().values())
        dupes = sorted({m for m in macs if macs.count(m) > 1})
        if dupes:
            raise ValueError(f"a tag can show one item only; MACs mapped twice: {', '.join(dupes)}")
        return self

    def tag_map(self) -> dict[str, str]:
        out = read_tags_file(self.tags_file) if self.tags_file else {}
        return out | dict(self.tags)


def render_tag_content(item: PriceItem, currency: str, version: int, layout: TagLayout) -> str:
    """The AP's JSON drawing commands ({"text": [x, y, text, font, color]}) for one item. The price version
    is part of the content, so every version changes the tag's hash and a confirmation is never ambiguous."""
    name = item.description if len(item.description) <= layout.name_chars else \
        item.description[: layout.name_chars - 1] + "…"
    w, h, c = layout.width, layout.height, layout.color
    elements: list[dict[str, list[Any]]] = [
        {"text": [4, 2, name, layout.font_name, c]},
        {"text": [4, h // 5, format_money(item.price, currency), layout.font_price, c]},
    ]
    unit = unit_price_text(item, currency)
    if unit:
        elements.append({"text": [4, h - 24, unit, layout.font_small, c]})
    elements.append({"text": [w - 70, h - 24, f"v{version}", layout.font_small, c]})
    return json.dumps(elements, ensure_ascii=False, separators=(",", ":"))


class OpenEPaperLink(Driver):
    config_model: ClassVar[type[DeviceConfig]] = OpenEPaperLinkConfig
    price_role = "label"

    def __init__(self, config: DeviceConfig, ctx: DeviceContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, OpenEPaperLinkConfig)
        self.cfg = config
        self.tags = config.tag_map()
        self._state: EslState | None = None
        self._state_lock = asyncio.Lock()
        self.ap = AccessPoint(config.url, config.request_timeout, config.max_parallel)
        self._wake = asyncio.Event()
        self._announced: set[int] = set()

    # plumbing -----------------------------------------------------------------------------------------------
    async def state(self) -> EslState:
        async with self._state_lock:  # run() and the price coordinator may both ask first
            if self._state is None:
                self._state = await self._open_state()
            return self._state

    async def _open_state(self) -> EslState:
        path = self.cfg.state_path or self.ctx.data_dir / f"esl-{self.cfg.id}.db"
        return await asyncio.to_thread(EslState, path, self.ctx.storage_sync)

    # the loop -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        state = await self.state()
        try:
            while True:
                try:
                    await self._restore(state)
                    await self._reprint(state)
                    pushes = await asyncio.to_thread(state.unconfirmed)
                    waiting = await asyncio.to_thread(self._waiting_for_tags, state)
                    if pushes or waiting:
                        await self._refresh(state, pushes)
                    elif self.tags:
                        await self.ap.get_tag(next(iter(self.tags.values())))
                    else:
                        await self.ap.all_tags()
                    self.ctx.seen()
                    self._report_stale(await asyncio.to_thread(state.unconfirmed))
                except AccessPointError as err:
                    self.ctx.set_health(Health.OFFLINE, str(err))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.poll_interval):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            await self.ap.close()

    def _report_stale(self, pushes: list[Push]) -> None:
        now = time.time()
        stale = [p for p in pushes if now - p.pushed_at > self.cfg.stale_after]
        if stale:
            macs = ", ".join(sorted({p.mac for p in stale})[:10])
            self.ctx.set_health(Health.DEGRADED, f"{len(stale)} tag(s) have not taken new content within "
                                                 f"{self.cfg.stale_after:g}s: {macs}")
        else:
            self.ctx.set_health(Health.OK)

    @staticmethod
    def _waiting_for_tags(state: EslState) -> set[str]:
        """MACs whose restore or reprint the AP took and the tag has not fetched yet."""
        return {p.mac for p in state.restores_pending(uploaded=True)} | {m for m, _c in state.reprints(uploaded=True)}

    async def _refresh(self, state: EslState, pushes: list[Push]) -> None:
        """Ask the AP about the pushes still unconfirmed; a tag with pending 0 and a new hash has its content (a
        restore: pending 0 and the hash from before the aborted push; a reprint: pending 0)."""
        restores = await asyncio.to_thread(state.restores_pending, True)
        reprints = await asyncio.to_thread(state.reprints, True)
        if len(pushes) + len(restores) + len(reprints) > 20:
            records = await self.ap.all_tags()
        else:
            macs = sorted({p.mac for p in pushes} | {p.mac for p in restores} | {m for m, _c in reprints})
            got = await asyncio.gather(*(self.ap.get_tag(m) for m in macs), return_exceptions=True)
            for r in got:
                if isinstance(r, BaseException) and not isinstance(r, AccessPointError):
                    raise r
            if got and all(isinstance(r, AccessPointError) for r in got):
                raise got[0]  # type: ignore[misc]
            records = {r["mac"]: r for r in got if isinstance(r, dict)}
        versions = set()
        for p in pushes:
            rec = records.get(p.mac)
            if rec and rec["pending"] == 0 and rec["hash"] != p.hash_before:
                await asyncio.to_thread(state.confirm, p.version, p.mac, rec["hash"])
                versions.add(p.version)
        for p in restores:
            rec = records.get(p.mac)
            if rec and rec["pending"] == 0 and rec["hash"] == p.hash_before:
                await asyncio.to_thread(state.restored, p.version, p.mac)
        for mac, _content in reprints:
            rec = records.get(mac)
            if rec and rec["pending"] == 0:
                await asyncio.to_thread(state.reprint_done, mac, True)
        for v in sorted(versions - self._announced):
            if await asyncio.to_thread(state.all_confirmed, v):
                self._announced.add(v)
                await self.ctx.emit("label", {"event": "esl_confirmed", "version": v})

    async def _restore(self, state: EslState) -> None:
        for p in await asyncio.to_thread(state.restores_pending):
            assert p.previous_content is not None
            await self.ap.upload(p.mac, p.previous_content)
            await asyncio.to_thread(state.restore_uploaded, p.version, p.mac)

    async def _reprint(self, state: EslState) -> None:
        for mac, content in await asyncio.to_thread(state.reprints, False):
            await self.ap.upload(mac, content)
            await asyncio.to_thread(state.reprint_done, mac, False)

    # PriceTarget --------------------------------------------------------------------------------------------
    async def price_prepare(self, change: PriceChange) -> None:
        state = await self.state()
        if await asyncio.to_thread(state.version_state, change.version) == "aborted":
            raise PrepareFailed(f"{self.cfg.id}: price version {change.version} was aborted here")
        await asyncio.to_thread(state.set_version, change.version, "prepared")
        mine = [(i.sku, self.tags[i.sku], render_tag_content(i, change.currency, change.version, self.cfg.layout))
                for i in change.changed if i.sku in self.tags]
        done = await asyncio.to_thread(state.plan, change.version, [(m, sku, c) for sku, m, c in mine])
        if change.effective_at is not None and change.effective_at > time.time():
            # no valid-from on a tag: check the AP knows every tag now, push at commit (effective_at)
            await self._check_tags(mine)
            log.info("version %d: %d tag(s) checked; content goes out at its effective time", change.version,
                     len(mine), extra={"device": self.cfg.id})
            return
        await self._push(change.version, [(sku, m, c) for sku, m, c in mine if m not in done], len(mine))

    async def _check_tags(self, mine: list[tuple[str, str, str]]) -> None:
        try:
            records = await self.ap.all_tags()
        except AccessPointError as err:
            self.ctx.set_health(Health.OFFLINE, str(err))
            raise PrepareFailed(f"{self.cfg.id}: {err}") from err
        unknown = [f"{sku}@{m}" for sku, m, _c in mine if m not in records]
        if unknown:
            raise PrepareFailed(f"{self.cfg.id}: {len(unknown)} tag(s) not known to the access point: "
                                + ", ".join(unknown[:5]))

    async def _push(self, version: int, todo: list[tuple[str, str, str]], total: int) -> None:
        """Upload (sku, mac, content) to the tags, recording each tag's hash and previous content first."""
        state = await self.state()

        # Many tags: one paged sweep of the AP's database reads every hash before the pushes (far fewer requests
        # than one get_db per tag); a few tags: ask for each.
        failed: list[str] = []
        try:
            if len(todo) > 20:
                records = await self.ap.all_tags()
            else:
                got = await asyncio.gather(*(self.ap.get_tag(m) for _s, m, _c in todo), return_exceptions=True)
                records = {m: r for (_s, m, _c), r in zip(todo, got, strict=True) if isinstance(r, dict)}
                failed += [f"{sku}@{m}: {r}" for (sku, m, _c), r in zip(todo, got, strict=True)
                           if isinstance(r, Exception)]
        except AccessPointError as err:
            self.ctx.set_health(Health.OFFLINE, str(err))
            raise PrepareFailed(f"{self.cfg.id}: {err}") from err
        failed += [f"{sku}@{m}: tag {m} is not known to the access point" for sku, m, _c in todo
                   if m not in records and not any(f.startswith(f"{sku}@{m}:") for f in failed)]
        todo = [t for t in todo if t[1] in records]
        known = set((await asyncio.to_thread(state.shown)).keys())
        found = await asyncio.gather(*(self.ap.current_content(m) for _s, m, _c in todo if m not in known))
        found_by_mac = dict(zip([m for _s, m, _c in todo if m not in known], found, strict=True))
        await asyncio.to_thread(state.record_pushes, version, [
            (m, sku, content, records[m]["hash"], found_by_mac.get(m)) for sku, m, content in todo])
        results = await asyncio.gather(*(self.ap.upload(m, c) for _s, m, c in todo), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
        await asyncio.to_thread(state.mark_uploaded, version,
                                [m for (_s, m, _c), r in zip(todo, results, strict=True) if r is None])
        failed += [f"{sku}@{m}: {r}" for (sku, m, _c), r in zip(todo, results, strict=True) if isinstance(r, Exception)]
        if failed:
            self.ctx.set_health(Health.DEGRADED, failed[0])
            raise PrepareFailed(f"{self.cfg.id}: {len(failed)} of {total} tag(s) not updated: "
                                + "; ".join(failed[:5]))
        log.info("version %d: content pushed to %d tag(s)", version, len(todo), extra={"device": self.cfg.id})
        self._wake.set()

    async def price_commit(self, version: int) -> None:
        """Commit; a scheduled version's content goes to its tags now. Raises while the AP does not take it
        (the coordinator delivers the commit again until it does)."""
        state = await self.state()
        planned = await asyncio.to_thread(state.planned, version)
        if planned:
            try:
                await self._push(version, [(sku, m, c) for m, sku, c in planned], len(planned))
            except PrepareFailed as err:
                raise AccessPointError(str(err)) from err
        await asyncio.to_thread(state.set_version, version, "committed")

    async def price_abort(self, version: int) -> None:
        state = await self.state()
        await asyncio.to_thread(state.abort, version)
        missing = await asyncio.to_thread(state.no_restore, version)
        if missing:
            log.warning("version %d aborted; no earlier content known for %d tag(s): %s", version, len(missing),
                        ", ".join(missing[:20]), extra={"device": self.cfg.id})
            await self.ctx.emit("label", {"event": "esl_no_restore", "version": version, "skus": missing[:50]})
        try:
            await self._restore(state)
        except AccessPointError as err:  # the loop keeps trying; the abort itself is recorded
            log.warning("version %d aborted; old content not back yet: %s", version, err,
                        extra={"device": self.cfg.id})
            self._wake.set()

    async def price_label_states(self, version: int) -> dict[str, LabelShows]:
        """From this gateway's record of the tags (the loop keeps it current; nudged here to look now)."""
        states = await asyncio.to_thread((await self.state()).label_states, version)
        if any(v != "new" for v in states.values()):
            self._wake.set()
        return states

    async def price_restored(self, version: int) -> bool:
        return all(v == "old" for v in (await self.price_label_states(version)).values())

    async def price_reprint(self, request_id: str, change: PriceChange) -> int:
        tags = [(self.tags[i.sku], i.sku, render_tag_content(i, change.currency, change.version, self.cfg.layout))
                for i in change.changed if i.sku in self.tags]
        await asyncio.to_thread((await self.state()).request_reprints, request_id, change.version, tags)
        log.info("reprint %s: %d tag(s) queued", request_id, len(tags), extra={"device": self.cfg.id})
        self._wake.set()
        return len(tags)

    async def price_confirmed(self, version: int) -> bool:
        state = await self.state()
        if await asyncio.to_thread(state.all_confirmed, version):
            return True
        pushes = await asyncio.to_thread(state.unconfirmed, version)
        if pushes and await asyncio.to_thread(state.version_state, version) != "aborted":
            try:
                await self._refresh(state, pushes)
            except AccessPointError as err:
                log.debug("cannot check tags for version %d: %s", version, err)
        return await asyncio.to_thread(state.all_confirmed, version)

    async def price_reported_version(self) -> int | None:
        return await asyncio.to_thread((await self.state()).latest_confirmed)

    async def price_labels_left(self, version: int) -> tuple[int, int]:
        return await asyncio.to_thread((await self.state()).labels_left, version)

    async def tag_states(self) -> list[dict[str, Any]]:
        """Every mapped tag as the AP sees it now beside what this gateway last confirmed on it: `drift` is true
        when a tag with nothing pending shows another hash (content changed behind the gateway's back)."""
        shown = await asyncio.to_thread((await self.state()).shown)
        records = await self.ap.all_tags()
        out = []
        for sku, mac in sorted(self.tags.items()):
            rec = records.get(mac)
            expected = shown.get(mac)
            out.append({
                "sku": sku, "mac": mac, "version": expected[1] if expected else None,
                "expected_hash": expected[2] if expected else None,
                "hash": rec["hash"] if rec else None, "pending": rec["pending"] if rec else None,
                "lastseen": rec.get("lastseen") if rec else None,
                "drift": rec is None or (expected is not None and rec["pending"] == 0 and rec["hash"] != expected[2]),
            })
        return out
