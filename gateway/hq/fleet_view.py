"""The read side of head office's database: what the fleet dashboard and its JSON API show.

Every list is paginated by key (``after`` = the last store id of the previous page) and reads only the small,
indexed tables the tracker maintains (`stores`, `store_groups`, `store_problems`, `alerts`), so a page costs the
same with 50 stores or 50,000. Recent events show kind, device, seq and time, never the event data.
"""

from __future__ import annotations

import time
from typing import Any

from storelink.hq.db import Database, loads
from storelink.hq.summary import PROBLEMS
from storelink.hq.tracker import gap_summary

PAGE_MAX = 1000
STORE_COLUMNS = ("store_id", "online", "state_since", "version", "group_list", "price_version", "latest_published",
                 "price_pending", "stale_devices", "drift", "devices_total", "devices_bad", "outbox_depth",
                 "outbox_oldest_at", "outbox_reported_at", "evicted_total", "last_seen", "open_alerts", "problems",
                 "max_seq")
JSON_COLUMNS = {"group_list", "stale_devices", "devices_bad"}


def _store(row: tuple[Any, ...]) -> dict[str, Any]:
    out = {k: (loads(v) if k in JSON_COLUMNS else v) for k, v in zip(STORE_COLUMNS, row, strict=True)}
    out["online"] = None if out["online"] is None else bool(out["online"])
    out["problems"] = out["problems"].split() if out["problems"] else []
    out["groups"] = out.pop("group_list") or []
    return out


def _filters(group: str | None, problem: str | None, search: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if group:
        clauses.append("store_id IN (SELECT store_id FROM store_groups WHERE group_name = ?)")
        params.append(group)
    if problem:
        clauses.append("store_id IN (SELECT store_id FROM store_problems WHERE problem = ?)")
        params.append(problem)
    if search:
        clauses.append("store_id LIKE ?")
        params.append(f"%{search.replace('%', '').replace('_', '')}%")
    return (" AND ".join(clauses), params)


def fleet_page(db: Database, *, group: str | None = None, problem: str | None = None, search: str | None = None,
               after: str | None = None, limit: int = 100) -> dict[str, Any]:
    if problem and problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {', '.join(PROBLEMS)}")
    limit = max(1, min(limit, PAGE_MAX))
    where, params = _filters(group, problem, search)
    page_where = " AND ".join(w for w in (where, "store_id > ?" if after else "") if w)
    rows = db.query(f"SELECT {', '.join(STORE_COLUMNS)} FROM stores{' WHERE ' + page_where if page_where else ''} "
                    "ORDER BY store_id LIMIT ?", [*params, *([after] if after else []), limit + 1])
    stores = [_store(r) for r in rows[:limit]]
    total = int(db.query(f"SELECT count(*) FROM stores{' WHERE ' + where if where else ''}", params)[0][0])
    gwhere, gparams = _filters(group, None, search)
    counts = {p: int(n) for p, n in db.query(
        "SELECT problem, count(*) FROM store_problems"
        f"{' WHERE ' + gwhere if gwhere else ''} GROUP BY problem", gparams)}
    return {"stores": stores, "next": stores[-1]["store_id"] if len(rows) > limit else None, "total": total,
            "problem_counts": {p: counts.get(p, 0) for p in PROBLEMS}, "fleet": fleet_totals(db),
            "generated_at": time.time()}


def fleet_totals(db: Database) -> dict[str, Any]:
    online, offline, unknown, depth, oldest, last_event, stores = db.query(
        "SELECT sum(CASE WHEN online = 1 THEN 1 ELSE 0 END), sum(CASE WHEN online = 0 THEN 1 ELSE 0 END), "
        "sum(CASE WHEN online IS NULL THEN 1 ELSE 0 END), coalesce(sum(outbox_depth), 0), min(outbox_oldest_at), "
        "max(last_event_at), count(*) FROM stores")[0]
    alerts = {k: int(n) for k, n in db.query(
        "SELECT kind, count(*) FROM alerts WHERE closed_at IS NULL GROUP BY kind")}
    latest = db.query("SELECT max(version) FROM price_batches")[0][0]
    workers = [{"worker": w, "host": h, "started_at": s, "heartbeat_at": hb, "received_total": r,
                "inserted_total": i, "duplicates_total": d, "bad_total": b}
               for w, h, s, hb, r, i, d, b in db.query(
                   "SELECT worker, host, started_at, heartbeat_at, received_total, inserted_total, duplicates_total, "
                   "bad_total FROM workers ORDER BY worker")]
    return {"stores": int(stores or 0), "online": int(online or 0), "offline": int(offline or 0),
            "unknown": int(unknown or 0), "outbox_depth": int(depth or 0), "oldest_undelivered_at": oldest,
            "last_event_at": last_event, "open_alerts": alerts, "latest_price_version": latest, "workers": workers,
            "bad_messages": int(db.query("SELECT count(*) FROM bad_messages")[0][0])}


def groups(db: Database) -> list[dict[str, Any]]:
    return [{"group": g, "stores": int(n)} for g, n in db.query(
        "SELECT group_name, count(*) FROM store_groups GROUP BY group_name ORDER BY group_name")]


ALERT_COLUMNS = ("id", "store_id", "kind", "akey", "severity", "message", "data", "opened_at", "closed_at")


def _alert(row: tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(ALERT_COLUMNS, row, strict=True))
    out["data"] = loads(out["data"])
    out["key"] = out.pop("akey")
    return out


def alert_list(db: Database, *, store: str | None = None, kind: str | None = None, open_only: bool = True,
               before: int | None = None, limit: int = 100) -> dict[str, Any]:
    clauses, params = [], []
    for clause, value in (("store_id = ?", store), ("kind = ?", kind), ("id < ?", before)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    if open_only:
        clauses.append("closed_at IS NULL")
    limit = max(1, min(limit, PAGE_MAX))
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = db.query(f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts{where} ORDER BY id DESC LIMIT ?",
                    [*params, limit + 1])
    items = [_alert(r) for r in rows[:limit]]
    return {"alerts": items, "next": items[-1]["id"] if len(rows) > limit else None}


def store_detail(db: Database, store: str) -> dict[str, Any] | None:
    rows = db.query(f"SELECT {', '.join(STORE_COLUMNS)} FROM stores WHERE store_id = ?", (store,))
    if not rows:
        return None
    out = _store(rows[0])
    latest: dict[str, tuple[Any, float, float | None]] = {}
    for topic, payload, received_at, live_at in db.query(
            "SELECT topic, payload, received_at, live_at FROM retained WHERE store_id = ?", (store,)):
        if topic not in latest or received_at > latest[topic][1]:
            latest[topic] = (loads(payload), received_at, live_at)
    out["devices"] = sorted((body for t, (body, _r, _l) in latest.items() if t.startswith("devices/") and body),
                            key=lambda d: str(d.get("device")))
    out["status"] = latest.get("status", (None,))[0]
    out["prices_state"] = latest.get("prices/state", (None,))[0]
    out["outbox_state"] = latest.get("outbox/state", (None,))[0]
    out["config_reported"] = latest.get("config/reported", (None,))[0]
    out["recent_events"] = [{"seq": s, "kind": k, "device": d, "ts": ts, "received_at": r} for s, k, d, ts, r in
                            db.query("SELECT seq, kind, device, ts, received_at FROM events WHERE store_id = ? "
                                     "ORDER BY seq DESC LIMIT 50", (store,))]
    out["gaps"] = gap_summary(db, store)
    out["alerts"] = [_alert(r) for r in db.query(
        f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts WHERE store_id = ? ORDER BY "
        "CASE WHEN closed_at IS NULL THEN 0 ELSE 1 END, id DESC LIMIT 100", (store,))]
    out["price_changes"] = [
        {"batch_id": b, "version": v, "prepared_at": p, "committed_at": c, "confirmed_at": f, "aborted_at": a,
         "rejected_at": r, "reason": why}
        for b, v, p, c, f, a, r, why in db.query(
            "SELECT batch_id, version, prepared_at, committed_at, confirmed_at, aborted_at, rejected_at, reason "
            "FROM store_prices WHERE store_id = ? ORDER BY coalesce(version, 0) DESC LIMIT 20", (store,))]
    return out
