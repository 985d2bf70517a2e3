"""The price journal's rows and the writes every stage of a change shares (coordinator, scheduler, settler).

``batches.phase`` says where a batch stands, ``targets`` where each device stands in it. Till target states:
``preparing`` -> ``prepared`` (PREPARE, and HOLD for an immediate change, answered) -> ``committed`` (or
``deferred``: a till without holds waits for the labels before a price increase) ; ``aborted`` ; ``excluded`` /
``failed`` / ``stale``. Label target states: ``preparing`` -> ``prepared`` -> ``committed`` ; ``aborted``;
``gone`` (removed from the config while it had something to deliver).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from storelink.prices.db import PriceDb
from storelink.prices.targets import Targets

log = logging.getLogger(__name__)
Emit = Callable[[str, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class BatchRow:
    batch_id: str
    version: int
    phase: str
    mode: str
    currency: str
    effective_at: float | None
    prepare_started: float | None
    changed: int | None
    labels_released: float | None

    @property
    def scheduled(self) -> bool:
        """Prepared ahead for a later effective_at (labels that cannot show a valid-from change at COMMIT)."""
        return self.effective_at is not None and self.prepare_started is not None \
            and self.effective_at > self.prepare_started


@dataclass(frozen=True)
class TargetRow:
    device: str
    role: str
    state: str
    protocol: int | None
    held: bool
    final_left: int | None
    catchup: bool


_COLS = "batch_id, version, phase, mode, currency, effective_at, prepare_started, changed, labels_released"
_TCOLS = "device, role, state, protocol, held, final_left, catchup"


class Journal:
    def __init__(self, db: PriceDb, targets: Targets, on_change: Callable[[], None]):
        self.db = db
        self.targets = targets
        self.on_change = on_change

    async def batch(self, batch_id: str) -> BatchRow:
        row = await self.db.read(lambda c: c.execute(f"SELECT {_COLS} FROM batches WHERE batch_id=?",
                                                     (batch_id,)).fetchone())
        return BatchRow(*row)

    async def batches(self, where: str, *args: Any) -> list[BatchRow]:
        rows = await self.db.read(lambda c: c.execute(f"SELECT {_COLS} FROM batches WHERE {where} ORDER BY version",
                                                      args).fetchall())
        return [BatchRow(*r) for r in rows]

    async def set_phase(self, batch_id: str, phase: str, reason: str | None = None, **cols: float) -> None:
        def txn(conn: Any) -> None:
            sets = "".join(f", {k}=?" for k in cols)
            conn.execute(f"UPDATE batches SET phase=?, reason=COALESCE(?, reason), updated_at=?{sets} "
                         "WHERE batch_id=?", (phase, reason, time.time(), *cols.values(), batch_id))
        await self.db.write(txn)
        self.on_change()

    async def set_target(self, batch_id: str, device: str, state: str, error: str | None = None,
                         **cols: int | None) -> None:
        sets = "".join(f", {k}=?" for k in cols)
        await self.db.write(lambda c: c.execute(
            f"UPDATE targets SET state=?, error=?, updated_at=?{sets} WHERE batch_id=? AND device=?",
            (state, error, time.time(), *cols.values(), batch_id, device)))

    async def set_cols(self, batch_id: str, device: str, **cols: int | None) -> None:
        sets = ", ".join(f"{k}=?" for k in cols)
        await self.db.write(lambda c: c.execute(
            f"UPDATE targets SET {sets}, updated_at=? WHERE batch_id=? AND device=?",
            (*cols.values(), time.time(), batch_id, device)))

    async def targets_of(self, batch_id: str, states: tuple[str, ...] | None = None,
                         role: str | None = None) -> list[TargetRow]:
        q = f"SELECT {_TCOLS} FROM targets WHERE batch_id=?"
        args: list[Any] = [batch_id]
        if states is not None:
            q += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        if role is not None:
            q += " AND role=?"
            args.append(role)
        rows = await self.db.read(lambda c: c.execute(q + " ORDER BY device", args).fetchall())
        return [TargetRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], bool(r[6])) for r in rows]

    async def mark_stale(self, device: str, role: str, stale: bool) -> None:
        await self.db.write(lambda c: c.execute(
            "INSERT INTO devices(device, role, stale, updated_at) VALUES(?,?,?,?) ON CONFLICT(device) DO UPDATE "
            "SET stale=excluded.stale, updated_at=excluded.updated_at", (device, role, int(stale), time.time())))
        self.on_change()

    async def device_states(self, batch_id: str) -> dict[str, str]:
        return await self.db.read(lambda c: dict(c.execute("SELECT device, state FROM targets WHERE batch_id=?",
                                                           (batch_id,)).fetchall()))

    async def record_tills(self, b: BatchRow, devices: list[str], state: str, committed: bool,
                           held: bool = False) -> None:
        """Journal that `devices` took a COMMIT/ABORT (and, for a commit, run the batch's version now)."""
        if not devices:
            return
        now = time.time()

        def txn(conn: Any) -> None:
            for device in devices:
                conn.execute("UPDATE targets SET state=?, error=NULL, held=MAX(held, ?), updated_at=? "
                             "WHERE batch_id=? AND device=?", (state, int(held), now, b.batch_id, device))
                if committed:
                    conn.execute(
                        "INSERT INTO devices(device, role, version, stale, updated_at) VALUES(?, 'till', ?, 0, ?) "
                        "ON CONFLICT(device) DO UPDATE SET version=excluded.version, stale=0, "
                        "updated_at=excluded.updated_at", (device, b.version, now))

        await self.db.write(txn)
        self.on_change()

    async def deliver_tills(self, b: BatchRow, rows: list[TargetRow], action: str, retry: float, give_up: float,
                            when_reached: Callable[[], Awaitable[None]] | None = None,
                            crash: Callable[[], None] | None = None) -> None:
        """COMMIT or ABORT `rows` (tills), retrying until it sticks or `give_up` seconds pass; a till that never
        took it is marked stale (the catch-up brings it to the active version later). `when_reached` runs
        once every connected till has taken it, or at the give-up (the labels may change then: a till still on
        its old prices is either away or stale, and a stale till must not sell; one that answered but failed is
        retried first, so a scheduled decrease never shows on a label while that till charges the old price)."""
        deadline = time.monotonic() + give_up
        pending = list(rows)
        released = False
        committed = action == "commit"

        async def release() -> None:
            nonlocal released
            if not released and when_reached is not None:
                released = True
                await when_reached()

        while pending:
            async def one(row: TargetRow) -> bool:
                drv = self.targets.driver(row.device)
                if drv is None:
                    return False
                try:
                    if action == "commit":
                        await drv.price_commit(b.version)
                    else:
                        await drv.price_abort(b.version)
                except Exception as err:
                    log.info("batch %s: %s to %s failed (%s); retrying", b.batch_id, action.upper(), row.device, err)
                    return False
                return True

            # the first target alone (so a crash test can stop between the first and the rest), then the others
            # at once; their outcomes are journalled in one transaction
            first_ok = await one(pending[0])
            if first_ok:
                await self.record_tills(b, [pending[0].device], "committed" if committed else "aborted", committed,
                                        held=committed and (pending[0].protocol or 1) >= 2)
                if crash is not None:
                    crash()
            rest = pending[1:]
            results = await asyncio.gather(*(one(r) for r in rest))
            done = [r for r, ok in zip(rest, results, strict=True) if ok]
            for held in (True, False):
                await self.record_tills(b, [r.device for r in done if ((r.protocol or 1) >= 2) == held],
                                        "committed" if committed else "aborted", committed, held=committed and held)
            pending = ([] if first_ok else [pending[0]]) + [r for r, ok in zip(rest, results, strict=True) if not ok]
            if all(self.targets.driver(r.device) is None for r in pending):
                await release()  # every till that is there took it (the others are away: stale when back)
            if not pending:
                return
            if time.monotonic() > deadline:
                for row in pending:
                    log.warning("batch %s: %s never reached %s; marking it stale", b.batch_id, action, row.device)
                    await self.set_target(b.batch_id, row.device, "stale", f"{action} not delivered")
                    await self.mark_stale(row.device, row.role, True)
                await release()
                return
            await asyncio.sleep(retry)
