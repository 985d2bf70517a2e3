"""The fleet summary: one `stores` row per store, folded from its retained states, plus its conditions and flags.

Steps 1 and 5 of storelink.hq.tracker. The dashboard reads only `stores`, `store_groups` and `store_problems`
(all indexed), so listing 5,000 stores never touches the events table.

Problem flags (the dashboard's filter): offline, behind (price version older than the latest published), stale
(a till behind the store's price book), devices (a device not ok), drift (labels not showing the book's prices),
gaps (events missing), overcharge (an overcharge in the last day), backlog (undelivered events older than
`BACKLOG_AGE`), outdated (software older than the newest version in the fleet).
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

from storelink.hq import alerts
from storelink.hq.db import Database, loads
from storelink.hq.records import parse_ts

PROBLEMS = ("offline", "behind", "stale", "devices", "drift", "gaps", "overcharge", "backlog", "outdated")
BEHIND_GRACE = 300.0  # seconds a store may take to apply a published batch before it counts as behind
BACKLOG_AGE = 300.0
OVERLAP = 10.0  # retained rows are re-read this far back (a worker's commit may land after its received_at)
ROLLING = 30  # every pass also refolds 1/ROLLING of all stores, so nothing stays missed for long
CHUNK = 500


def _version_key(text: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)) if isinstance(text, str) else ()


class Summary:
    def __init__(self, db: Database):
        self.db = db
        self.mark = 0.0
        self.turn = 0

    # -- 1. retained states -> stores ---------------------------------------------------------------------------
    def fold_retained(self, now: float) -> set[str]:
        if self.mark == 0.0:
            stores = [s for (s,) in self.db.query("SELECT DISTINCT store_id FROM retained")]
        else:
            self.turn = (self.turn + 1) % ROLLING
            changed = {s for (s,) in self.db.query("SELECT DISTINCT store_id FROM retained WHERE received_at > ?",
                                                   (self.mark - OVERLAP,))}
            rolling = {s for (s,) in self.db.query("SELECT store_id FROM stores")
                       if zlib.crc32(s.encode()) % ROLLING == self.turn}
            stores = sorted(changed | rolling)
        self.mark = now
        for i in range(0, len(stores), CHUNK):
            self._fold(stores[i:i + CHUNK])
        return set(stores)

    def _fold(self, stores: list[str]) -> None:
        marks = ",".join("?" * len(stores))
        latest: dict[str, dict[str, tuple[Any, float, float | None]]] = {}
        live: dict[str, float] = {}
        for store, topic, payload, received_at, live_at in self.db.query(
                f"SELECT store_id, topic, payload, received_at, live_at FROM retained WHERE store_id IN ({marks})",
                stores):
            topics = latest.setdefault(store, {})
            if topic not in topics or received_at > topics[topic][1]:
                topics[topic] = (loads(payload), received_at, live_at)
            if live_at is not None:
                live[store] = max(live.get(store, 0.0), live_at)
        current = {r[0]: r[1:] for r in self.db.query(
            f"SELECT store_id, online, state_since, version, group_list FROM stores WHERE store_id IN ({marks})",
            stores)}
        updates: list[tuple[Any, ...]] = []
        groups: dict[str, list[str]] = {}
        for store, topics in latest.items():
            online, since, version, group_json = current.get(store, (None, None, None, None))
            row, new_groups = self._fields(topics, online, since, version, loads(group_json), live.get(store))
            updates.append((*row, store))
            if new_groups is not None:
                groups[store] = new_groups
        with self.db.transaction():
            self.db.executemany(
                "UPDATE stores SET online = ?, state_since = ?, version = ?, started_at = ?, group_list = ?, "
                "price_version = ?, price_batch = ?, price_pending = ?, stale_devices = ?, drift = ?, "
                "devices_total = ?, devices_bad = ?, outbox_depth = ?, outbox_oldest_at = ?, outbox_reported_at = ?, "
                "evicted_total = ?, last_seen = CASE WHEN last_event_at IS NULL OR last_event_at < ? THEN ? "
                "ELSE last_event_at END WHERE store_id = ?",
                [(*u[:16], u[16], u[16], u[17]) for u in updates])
            for store, names in groups.items():
                self.db.execute("DELETE FROM store_groups WHERE store_id = ?", (store,))
                self.db.executemany("INSERT INTO store_groups (group_name, store_id) VALUES (?, ?) "
                                    "ON CONFLICT DO NOTHING", [(g, store) for g in names])

    @staticmethod
    def _fields(topics: dict[str, tuple[Any, float, float | None]], online: Any, since: Any, version: Any,
                groups: Any, live: float | None) -> tuple[tuple[Any, ...], list[str] | None]:
        status, status_at, status_live = topics.get("status", (None, 0.0, None))
        started_at = None
        new_groups = None
        if isinstance(status, dict):
            now_online = 1 if status.get("state") == "online" else 0
            started_at = status.get("started_at")
            if now_online != online:
                # When it changed: the moment it came live; for the broker's retained copy (head office was not
                # listening when it changed) an online store's start, an offline one's is unknown.
                came_live = status_live is not None and status_live >= status_at - 1.0
                since = status_live if came_live else (parse_ts(started_at) if now_online else None)
            online = now_online
            version = status.get("version") or version  # the Last Will carries no version: keep the last known
            if isinstance(status.get("groups"), list):
                new_groups = sorted({g for g in status["groups"] if isinstance(g, str)})
                groups = new_groups
        prices = topics.get("prices/state", (None, 0.0, None))[0]
        price_version = price_batch = pending = None
        stale: list[str] = []
        drift = 0
        if isinstance(prices, dict):
            price_version, price_batch = prices.get("active_version"), prices.get("active_batch")
            p = prices.get("pending")
            if isinstance(p, dict):
                pending = f"v{p.get('version')} {p.get('phase')}"
            devs = prices.get("devices")
            devs = devs if isinstance(devs, dict) else {}
            stale = sorted(d for d, v in devs.items() if isinstance(v, dict) and v.get("state") == "stale")
            drift = int(prices.get("drift") or 0)
        bad: list[dict[str, Any]] = []
        total = 0
        for topic, (body, _at, _live) in sorted(topics.items()):
            if topic.startswith("devices/") and isinstance(body, dict):
                total += 1
                if body.get("state") != "ok":
                    bad.append({"device": body.get("device"), "state": body.get("state"),
                                "last_error": body.get("last_error")})
        # When a report last came live from the store: the broker's retained copy, sent again when a worker
        # subscribes, is no news (the gap tracking asks for a report made after it saw a gap).
        outbox, _outbox_received, outbox_at = topics.get("outbox/state", (None, None, None))
        depth = oldest = evicted = None
        if isinstance(outbox, dict):
            depth, evicted = outbox.get("depth"), outbox.get("evicted_total")
            oldest = parse_ts(outbox.get("oldest_undelivered_at"))
        else:
            outbox_at = None
        row = (online, since, version, started_at, json.dumps(groups) if groups is not None else None,
               price_version, price_batch, pending, json.dumps(stale), drift, total, json.dumps(bad), depth, oldest,
               outbox_at, evicted, live)
        return row, new_groups

    # -- 5. conditions, flags -----------------------------------------------------------------------------------
    def latest_published(self, now: float) -> tuple[dict[str, tuple[int, float]], dict[str, tuple[int, float]]]:
        """The newest version in force per store target and per group, with when it came into force."""
        by_store: dict[str, tuple[int, float]] = {}
        by_group: dict[str, tuple[int, float]] = {}
        for store, group, version, at in self.db.query(
                "SELECT target_store, target_group, version, coalesce(effective_at, published_at) FROM price_batches "
                "WHERE coalesce(effective_at, published_at) <= ?", (now,)):
            target = by_store if store is not None else by_group
            key = store if store is not None else group
            if key not in target or version > target[key][0]:
                target[key] = (int(version), float(at))
        return by_store, by_group

    def evaluate(self, dirty: set[str], now: float) -> None:
        alerts.expire_incidents(self.db, now)
        if self.turn == 0:  # every ROLLING passes: every store (a batch coming into force changes them all)
            dirty = dirty | {s for (s,) in self.db.query("SELECT store_id FROM stores")}
        if not dirty:
            return
        by_store, by_group = self.latest_published(now)
        newest_sw = max((_version_key(v) for (v,) in self.db.query(
            "SELECT DISTINCT version FROM stores WHERE version IS NOT NULL")), default=())
        stores = sorted(dirty)
        for i in range(0, len(stores), CHUNK):
            self._evaluate(stores[i:i + CHUNK], by_store, by_group, newest_sw, now)

    def _evaluate(self, stores: list[str], by_store: dict[str, tuple[int, float]],
                  by_group: dict[str, tuple[int, float]], newest_sw: tuple[int, ...], now: float) -> None:
        marks = ",".join("?" * len(stores))
        rows = self.db.query(
            "SELECT store_id, online, version, group_list, price_version, stale_devices, drift, devices_bad, "
            f"outbox_depth, outbox_oldest_at FROM stores WHERE store_id IN ({marks})", stores)
        gaps = {s for (s,) in self.db.query(
            f"SELECT DISTINCT store_id FROM seq_gaps WHERE state = 'missing' AND store_id IN ({marks})", stores)}
        overcharged = {s for (s,) in self.db.query(
            "SELECT DISTINCT store_id FROM alerts WHERE kind = 'overcharge' AND closed_at IS NULL "
            f"AND store_id IN ({marks})", stores)}
        with self.db.transaction():
            flags: dict[str, list[str]] = {}
            latest: dict[str, int | None] = {}
            for store, online, version, group_json, price_version, stale_json, drift, bad_json, depth, oldest in rows:
                candidates = [by_store[store]] if store in by_store else []
                candidates += [by_group[g] for g in (loads(group_json) or []) if g in by_group]
                newest = max(candidates, default=None)
                latest[store] = newest[0] if newest else None
                stale = loads(stale_json) or []
                behind = newest is not None and (price_version or 0) < newest[0] and now - newest[1] >= BEHIND_GRACE
                self._conditions(store, price_version, newest, behind, stale, int(drift or 0), now)
                f = [name for name, on in (
                    ("offline", online == 0), ("behind", behind), ("stale", bool(stale)),
                    ("devices", bool(loads(bad_json))), ("drift", bool(drift)), ("gaps", store in gaps),
                    ("overcharge", store in overcharged),
                    ("backlog", bool(depth) and oldest is not None and now - oldest > BACKLOG_AGE),
                    ("outdated", bool(version) and _version_key(version) < newest_sw)) if on]
                flags[store] = f
            counts = alerts.open_counts(self.db, stores)
            self.db.execute(f"DELETE FROM store_problems WHERE store_id IN ({marks})", stores)
            self.db.executemany("INSERT INTO store_problems (problem, store_id) VALUES (?, ?)",
                                [(p, s) for s, names in flags.items() for p in names])
            self.db.executemany("UPDATE stores SET problems = ?, open_alerts = ?, latest_published = ?, "
                                "updated_at = ? WHERE store_id = ?",
                                [(" ".join(f), counts.get(s, 0), latest.get(s), now, s) for s, f in flags.items()])

    def _conditions(self, store: str, price_version: Any, newest: tuple[int, float] | None, behind: bool,
                    stale: list[str], drift: int, now: float) -> None:
        if behind and newest is not None:
            alerts.open_alert(self.db, store, "price_behind", "prices",
                              f"store runs price version {price_version if price_version is not None else 'none'}; "
                              f"version {newest[0]} is published for it",
                              {"running": price_version, "published": newest[0], "in_force_from": newest[1]}, now)
        alerts.close_others(self.db, store, "price_behind", ["prices"] if behind else [], now)
        for device in stale:
            alerts.open_alert(self.db, store, "stale_till", str(device),
                              f"{device} is behind the store's price book (it was offline during a change) and may "
                              "charge old prices",
                              {"device": device}, now)
        alerts.close_others(self.db, store, "stale_till", [str(d) for d in stale], now)
        if drift:
            alerts.open_alert(self.db, store, "label_drift", "labels",
                              f"{drift} label(s) or till(s) do not show the store's active prices (reconciliation "
                              "audit)", {"drifting": drift}, now)
        alerts.close_others(self.db, store, "label_drift", ["labels"] if drift else [], now)
