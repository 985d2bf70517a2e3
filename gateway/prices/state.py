"""The retained ``storelink/{store}/prices/state`` report (also the "prices" section of GET /api/v1/status).

Rebuilt from the database whenever something changes (debounced), so what head office sees is what is on disk:
active version, the batch in progress and its phase, SKUs still in transition, and each device's version and
standing (``current``, ``stale``, ``pending``, ``unknown``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Literal

from storelink.contract import LastBatch, PendingBatch, PriceDeviceState, PricesStatePayload, TransitionState
from storelink.outbox import iso_ts
from storelink.prices.db import PriceDb, get_meta
from storelink.prices.models import IN_PROGRESS

log = logging.getLogger(__name__)


Role = Literal["till", "label"]


def _ts(value: float | None) -> str | None:
    return iso_ts(value) if value else None


def build_state(conn: sqlite3.Connection, store_id: str, devices: list[tuple[str, Role]], stale: set[str],
                drift: dict[str, str], current: str | None) -> PricesStatePayload:
    active = int(get_meta(conn, "active_version", "0") or 0)
    pending = conn.execute(
        "SELECT batch_id, version, phase, effective_at, chunks_done, chunks_total, item_count, changed, received_at "
        f"FROM batches WHERE phase IN ({','.join('?' * len(IN_PROGRESS))}) ORDER BY version DESC LIMIT 1",
        IN_PROGRESS).fetchone()
    last = conn.execute("SELECT batch_id, version, phase, reason, updated_at FROM batches "
                        "WHERE phase IN ('done','aborted','rejected','superseded','expired') "
                        "ORDER BY updated_at DESC LIMIT 1").fetchone()
    transition = conn.execute("SELECT t.batch_id, t.outcome, COUNT(c.sku) FROM transitions t LEFT JOIN changes c "
                              "ON c.batch_id=t.batch_id GROUP BY t.batch_id").fetchall()
    known = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT device, version, stale FROM devices")}
    in_batch: dict[str, str] = {}
    if pending is not None:
        in_batch = dict(conn.execute("SELECT device, state FROM targets WHERE batch_id=?", (pending[0],)).fetchall())
    out_devices: dict[str, PriceDeviceState] = {}
    standing: Literal["current", "stale", "pending", "unknown"]
    for device, role in devices:
        version, was_stale = known.get(device, (None, 0))
        if device in in_batch and in_batch[device] not in ("excluded",):
            standing = "pending"
        elif device in stale or (was_stale and role == "till"):
            standing = "stale"
        elif version is None:
            standing = "unknown"
        elif role == "till":
            standing = "current" if version == active else "stale"
        else:
            standing = "current"
        out_devices[device] = PriceDeviceState(role=role, version=version, state=standing,
                                               batch_state=in_batch.get(device), drift=drift.get(device))
    return PricesStatePayload(
        store_id=store_id,
        active_version=active,
        active_batch=get_meta(conn, "active_batch"),
        currency=get_meta(conn, "currency"),
        active_since=_ts(float(get_meta(conn, "active_since", "0") or 0)),
        items=conn.execute("SELECT COUNT(*) FROM book").fetchone()[0],
        pending=None if pending is None else PendingBatch(
            batch_id=pending[0], version=pending[1], phase=pending[2],
            effective_at=_ts(pending[3]), chunks_done=pending[4], chunks_total=pending[5],
            items=pending[6], changed=pending[7], received_at=_ts(pending[8]),
            running=current == pending[0],
        ),
        transition=[TransitionState(batch_id=b, outcome=o, skus=n) for b, o, n in transition],
        last=None if last is None else LastBatch(batch_id=last[0], version=last[1], outcome=last[2],
                                                 reason=last[3], at=_ts(last[4])),
        devices=out_devices,
        drift=len(drift),
        updated_at=iso_ts(time.time()),
    )


class StatePublisher:
    def __init__(self, db: PriceDb, build: Callable[[sqlite3.Connection], PricesStatePayload],
                 publish: Callable[[PricesStatePayload], None]):
        self.db = db
        self.build = build
        self.publish = publish
        self.latest: dict[str, Any] = {}
        self._dirty = asyncio.Event()

    def mark(self) -> None:
        self._dirty.set()

    async def refresh(self) -> dict[str, Any]:
        report = await self.db.read(self.build)
        self.publish(report)
        self.latest = report.model_dump()
        return self.latest

    async def run(self) -> None:
        self._dirty.set()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cannot build the price state")
            await asyncio.sleep(0.25)  # debounce: a burst of chunks gives one report
