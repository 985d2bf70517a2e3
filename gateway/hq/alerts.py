"""Head office's alerts: one row per problem, opened and closed by the tracker.

Two sorts. A *condition* (a store behind on prices, a stale till, label drift, missing events) is open while it
holds and closes by itself when it clears; the same problem coming back opens the same row again. An *incident*
(an overcharge, a rejected or aborted price batch) happened once: it is recorded once (its key is unique) and
stays open for `INCIDENT_HOLD` so the fleet view shows it, then closes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from storelink.hq.db import Database

INCIDENT_HOLD = 24 * 3600.0
INCIDENTS = ("overcharge", "price_rejected", "price_aborted")
SEVERITY = {"overcharge": "critical", "seq_gap": "critical", "price_rejected": "warning", "price_aborted": "warning",
            "price_behind": "warning", "stale_till": "warning", "label_drift": "warning"}
KINDS = tuple(SEVERITY)


def open_alert(db: Database, store: str, kind: str, key: str, message: str, data: dict[str, Any], now: float) -> None:
    if kind in INCIDENTS:
        db.execute("INSERT INTO alerts (store_id, kind, akey, severity, message, data, opened_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (store_id, kind, akey) DO NOTHING",
                   (store, kind, key, SEVERITY[kind], message, json.dumps(data), now))
        return
    db.execute("INSERT INTO alerts (store_id, kind, akey, severity, message, data, opened_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (store_id, kind, akey) DO UPDATE SET "
               "message = excluded.message, data = excluded.data, "
               "opened_at = CASE WHEN alerts.closed_at IS NULL THEN alerts.opened_at ELSE excluded.opened_at END, "
               "closed_at = NULL",
               (store, kind, key, SEVERITY[kind], message, json.dumps(data), now))


def close_others(db: Database, store: str, kind: str, keep: Iterable[str], now: float) -> None:
    """Close the store's open `kind` alerts whose key is not in `keep` (the condition cleared)."""
    keep = list(keep)
    marks = ",".join("?" * len(keep))
    extra = f" AND akey NOT IN ({marks})" if keep else ""
    db.execute(f"UPDATE alerts SET closed_at = ? WHERE store_id = ? AND kind = ? AND closed_at IS NULL{extra}",
               (now, store, kind, *keep))


def expire_incidents(db: Database, now: float) -> None:
    marks = ",".join("?" * len(INCIDENTS))
    db.execute(f"UPDATE alerts SET closed_at = ? WHERE closed_at IS NULL AND kind IN ({marks}) AND opened_at < ?",
               (now, *INCIDENTS, now - INCIDENT_HOLD))


def open_counts(db: Database, stores: list[str]) -> dict[str, int]:
    if not stores:
        return {}
    marks = ",".join("?" * len(stores))
    rows = db.query(f"SELECT store_id, count(*) FROM alerts WHERE closed_at IS NULL AND store_id IN ({marks}) "
                    "GROUP BY store_id", stores)
    return {s: int(n) for s, n in rows}


def money(amount: Any, currency: str | None) -> str:
    """Minor units as the till sent them, shown with two decimals (the contract's amounts are minor units)."""
    if not isinstance(amount, int | float):
        return "?"
    return f"{amount / 100:.2f}{' ' + currency if currency else ''}"
