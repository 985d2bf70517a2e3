"""The retained ``storelink/{store}/prices/state`` report (also the "prices" section of GET /api/v1/status).

Rebuilt from the database whenever something changes (debounced), so what head office sees is what is on disk:
active version, the batch in progress and its phase, the batches scheduled and when they take effect, the
changes still in transition (items with their old, new and charged price, label devices and labels left), whether
the clock is synchronised, and each device's version and standing. A till is ``current``, ``stale``, ``pending``
(in the batch being prepared), ``holding`` (charges at most min(old, new) until the labels show a change) or
``held_back`` (a till without holds, committed once the labels show a price increase); a label device is
``current`` only when nothing of it is unconfirmed: else ``confirming`` / ``restoring`` (labels of a commit or an
abort not yet known to show it), ``undelivered`` (it has not taken a commit or abort yet: away) or ``drift``
(past the deadline), with ``shows`` saying what it is known to display per open batch.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Literal

from storelink.contract import (
    ClockReport,
    LabelDeviceProgress,
    LabelShowsState,
    LastBatch,
    PendingBatch,
    PriceDeviceState,
    PricesStatePayload,
    ScheduledBatch,
    TransitionItem,
    TransitionState,
)
from storelink.outbox import iso_ts
from storelink.prices.db import PriceDb, get_meta
from storelink.prices.models import IN_PROGRESS

log = logging.getLogger(__name__)


Role = Literal["till", "label"]
Standing = Literal["current", "stale", "pending", "unknown", "holding", "held_back", "confirming", "restoring",
                   "undelivered", "drift"]


def _ts(value: float | None) -> str | None:
    return iso_ts(value) if value else None


# Items listed per transition (a 100,000-item change lists the first ones; `skus` says how many there are).
TRANSITION_ITEMS = 20
LabelProgress = dict[str, dict[str, dict[str, Any]]]  # batch -> label device -> {"confirmed", "left", "total"}


def _transitions(conn: sqlite3.Connection, labels: LabelProgress) -> list[TransitionState]:
    """Each batch whose labels are still confirming: its SKUs with the old, new and charged price (min of the
    two: what every till answers meanwhile), and per label device whether it confirmed and how many are left."""
    out = []
    rows = conn.execute("SELECT t.batch_id, t.outcome, t.since, b.version, (SELECT COUNT(*) FROM changes c "
                        "WHERE c.batch_id=t.batch_id) FROM transitions t LEFT JOIN batches b ON b.batch_id=t.batch_id "
                        "ORDER BY t.since").fetchall()
    for batch_id, outcome, since, version, skus in rows:
        items = conn.execute(
            "SELECT c.sku, COALESCE(b.description, s.description), c.old_price, c.new_price, c.kind FROM changes c "
            "LEFT JOIN book b ON b.sku=c.sku LEFT JOIN staged s ON s.batch_id=c.batch_id AND s.sku=c.sku "
            "WHERE c.batch_id=? ORDER BY c.sku LIMIT ?", (batch_id, TRANSITION_ITEMS)).fetchall()
        # (a copy: the settler updates these on the loop while this runs in the database thread)
        devices = {d: LabelDeviceProgress(**e) for d, e in list(labels.get(batch_id, {}).items())}
        lefts = [d.left for d in devices.values() if d.left is not None]
        out.append(TransitionState(
            batch_id=batch_id, version=version, outcome=outcome, since=_ts(since), skus=skus,
            items=[TransitionItem(sku=sku, description=desc, old_price=old, new_price=new, kind=kind,
                                  charged=min((p for p in (old, new) if p is not None), default=None))
                   for sku, desc, old, new, kind in items],
            labels=devices, labels_left=sum(lefts) if lefts else None))
    return out


def _label_standing(shows: LabelShowsState | None) -> Standing:
    if shows is None:
        return "current"
    if shows.undelivered:
        return "undelivered"
    if any(x.past_deadline for x in shows.batches):
        return "drift"
    if any(x.outcome == "aborted" for x in shows.batches):
        return "restoring"
    return "confirming" if shows.batches else "current"


def build_state(conn: sqlite3.Connection, store_id: str, devices: list[tuple[str, Role]], stale: set[str],
                drift: dict[str, str], current: str | None, clock: ClockReport, held_back: dict[str, int],
                labels: LabelProgress | None = None) -> PricesStatePayload:
    active = int(get_meta(conn, "active_version", "0") or 0)
    now = time.time()
    scheduled = conn.execute("SELECT batch_id, version, effective_at, decided_at FROM batches "
                             "WHERE phase='commit_decided' AND effective_at > ? ORDER BY version", (now,)).fetchall()
    pending = conn.execute(
        "SELECT batch_id, version, phase, effective_at, chunks_done, chunks_total, item_count, changed, received_at "
        f"FROM batches WHERE phase IN ({','.join('?' * len(IN_PROGRESS))}) AND NOT (phase='commit_decided' "
        "AND COALESCE(effective_at, 0) > ?) ORDER BY version DESC LIMIT 1", (*IN_PROGRESS, now)).fetchone()
    last = conn.execute("SELECT batch_id, version, phase, reason, updated_at FROM batches "
                        "WHERE phase IN ('done','aborted','rejected','superseded','expired') "
                        "ORDER BY updated_at DESC LIMIT 1").fetchone()
    known = {r[0]: (r[1], r[2], r[3]) for r in conn.execute("SELECT device, version, stale, shows FROM devices")}
    in_batch: dict[str, str] = {}
    if pending is not None and pending[2] in ("staging", "staged", "preparing"):
        in_batch = dict(conn.execute("SELECT device, state FROM targets WHERE batch_id=?", (pending[0],)).fetchall())
    holding = {r[0] for r in conn.execute(
        "SELECT DISTINCT t.device FROM targets t JOIN batches b ON b.batch_id=t.batch_id WHERE t.role='till' "
        "AND t.held=1 AND (t.final_left IS NULL OR t.final_left > 0) AND b.phase IN ('done','aborted','committed')")}
    out_devices: dict[str, PriceDeviceState] = {}
    standing: Standing
    for device, role in devices:
        version, was_stale, shows_json = known.get(device, (None, 0, None))
        shows = LabelShowsState.model_validate_json(shows_json) if shows_json else None
        if device in in_batch and in_batch[device] not in ("excluded",):
            standing = "pending"
        elif device in stale or (was_stale and role == "till"):
            standing = "stale"
        elif role == "label":
            standing = _label_standing(shows)
        elif device in held_back:
            standing = "held_back"
        elif version is None:
            standing = "unknown"
        elif version != active:
            standing = "stale"
        else:
            standing = "holding" if device in holding else "current"
        out_devices[device] = PriceDeviceState(role=role, version=held_back.get(device, version), state=standing,
                                               batch_state=in_batch.get(device), drift=drift.get(device),
                                               shows=shows if role == "label" else None)
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
        scheduled=[ScheduledBatch(batch_id=r[0], version=r[1], effective_at=_ts(r[2]), decided_at=_ts(r[3]))
                   for r in scheduled],
        transition=_transitions(conn, labels or {}),
        last=None if last is None else LastBatch(batch_id=last[0], version=last[1], outcome=last[2],
                                                 reason=last[3], at=_ts(last[4])),
        devices=out_devices,
        drift=len(drift),
        clock=clock,
        updated_at=iso_ts(now),
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

    async def current(self) -> dict[str, Any]:
        """The state as it is on disk now (for GET /api/v1/prices/state: publishing is the run loop's job)."""
        return (await self.db.read(self.build)).model_dump()

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
