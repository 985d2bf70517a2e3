"""Head office's schema, created and migrated by the service itself (`storelink hq ingest`, `hq serve`).

Each migration is a list of statements with ``{json}``, ``{id}``, ``{bigint}``, ``{double}`` and ``{int}`` for the
column types each backend spells differently. Migrations run in one transaction under a lock, so several ingest
workers starting at once migrate once; a database newer than this code is refused instead of being written with
an old idea of its tables. Times are epoch seconds (double precision), flags are integers.

Why the tables look as they do (the hot path is `events`; everything else is small):
- `events`: one row per store event, `id` unique (duplicates are dropped with ON CONFLICT DO NOTHING). Workers
  only ever insert here, so several of them never wait for each other.
- `retained`: the latest retained state per store, topic and worker. Every worker receives every retained message
  (a shared subscription would not get the retained snapshot), so each keeps its own row: no two workers ever
  update the same row, and readers take the newest. `live_at` is when one last came live from the store, not
  as the broker's retained copy on subscribe (which says nothing about the store being there now).
- `stores`, `store_groups`, `store_problems`, `seq_gaps`, `evictions`, `store_prices`, `alerts`: written only by
  the tracker (one worker at a time, under a lock) from the two tables above.
- `price_batches`, `price_items`: every price batch head office published (`hq publish-prices` and the batches
  the ingest sees on the downlink topics).
"""

from __future__ import annotations

import time

from storelink.hq.db import TYPES, Database, DatabaseError

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "initial schema", [
        """CREATE TABLE events (
            id TEXT PRIMARY KEY, store_id TEXT NOT NULL, seq {bigint} NOT NULL, kind TEXT NOT NULL,
            device TEXT NOT NULL, ts {double} NOT NULL, received_at {double} NOT NULL, data {json} NOT NULL)""",
        "CREATE INDEX events_by_store_seq ON events (store_id, seq)",
        """CREATE TABLE retained (
            store_id TEXT NOT NULL, topic TEXT NOT NULL, worker TEXT NOT NULL, payload {json},
            received_at {double} NOT NULL, live_at {double}, PRIMARY KEY (store_id, topic, worker))""",
        "CREATE INDEX retained_by_time ON retained (received_at)",
        """CREATE TABLE stores (
            store_id TEXT PRIMARY KEY, first_seen {double} NOT NULL,
            online {int}, state_since {double}, version TEXT, started_at TEXT, group_list {json},
            price_version {bigint}, price_batch TEXT, price_pending TEXT, latest_published {bigint},
            stale_devices {json}, drift {int}, devices_total {int}, devices_bad {json},
            outbox_depth {bigint}, outbox_oldest_at {double}, outbox_reported_at {double}, evicted_total {bigint},
            max_seq {bigint}, checked_seq {bigint}, compliance_seq {bigint}, notified_evicted {bigint},
            last_event_at {double}, last_seen {double}, open_alerts {int} NOT NULL DEFAULT 0,
            problems TEXT NOT NULL DEFAULT '', updated_at {double})""",
        """CREATE TABLE store_groups (
            group_name TEXT NOT NULL, store_id TEXT NOT NULL, PRIMARY KEY (group_name, store_id))""",
        "CREATE TABLE store_problems (problem TEXT NOT NULL, store_id TEXT NOT NULL, PRIMARY KEY (problem, store_id))",
        """CREATE TABLE seq_gaps (
            store_id TEXT NOT NULL, first_seq {bigint} NOT NULL, last_seq {bigint} NOT NULL, state TEXT NOT NULL,
            detected_at {double} NOT NULL, resolved_at {double}, PRIMARY KEY (store_id, first_seq))""",
        "CREATE INDEX seq_gaps_by_state ON seq_gaps (state, store_id)",
        """CREATE TABLE evictions (
            store_id TEXT NOT NULL, first_seq {bigint} NOT NULL, last_seq {bigint} NOT NULL,
            reported_at {double} NOT NULL, PRIMARY KEY (store_id, first_seq))""",
        """CREATE TABLE price_batches (
            batch_id TEXT PRIMARY KEY, version {bigint} NOT NULL, target_store TEXT, target_group TEXT,
            mode TEXT NOT NULL, currency TEXT, effective_at {double}, published_at {double} NOT NULL,
            item_count {int} NOT NULL, key_id TEXT, source TEXT NOT NULL, manifest {json} NOT NULL)""",
        "CREATE INDEX price_batches_by_store ON price_batches (target_store, version)",
        "CREATE INDEX price_batches_by_group ON price_batches (target_group, version)",
        """CREATE TABLE price_items (
            batch_id TEXT NOT NULL, sku TEXT NOT NULL, gtin TEXT, price {bigint} NOT NULL,
            PRIMARY KEY (batch_id, sku))""",
        "CREATE INDEX price_items_by_gtin ON price_items (batch_id, gtin)",
        """CREATE TABLE store_prices (
            store_id TEXT NOT NULL, batch_id TEXT NOT NULL, version {bigint}, prepared_at {double},
            committed_at {double}, confirmed_at {double}, aborted_at {double}, rejected_at {double}, reason TEXT,
            PRIMARY KEY (store_id, batch_id))""",
        """CREATE TABLE alerts (
            id {id}, store_id TEXT NOT NULL, kind TEXT NOT NULL, akey TEXT NOT NULL, severity TEXT NOT NULL,
            message TEXT NOT NULL, data {json} NOT NULL, opened_at {double} NOT NULL, closed_at {double},
            UNIQUE (store_id, kind, akey))""",
        "CREATE INDEX alerts_by_store ON alerts (store_id, closed_at)",
        "CREATE INDEX alerts_by_kind ON alerts (kind, closed_at)",
        """CREATE TABLE bad_messages (
            id {id}, topic TEXT NOT NULL, reason TEXT NOT NULL, payload_head TEXT, received_at {double} NOT NULL,
            worker TEXT NOT NULL)""",
        """CREATE TABLE workers (
            worker TEXT PRIMARY KEY, host TEXT NOT NULL, started_at {double} NOT NULL, heartbeat_at {double} NOT NULL,
            received_total {bigint} NOT NULL, inserted_total {bigint} NOT NULL, duplicates_total {bigint} NOT NULL,
            bad_total {bigint} NOT NULL, tracker {int} NOT NULL DEFAULT 0)""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ]),
]
LATEST = MIGRATIONS[-1][0]


def schema_version(db: Database) -> int:
    """0 for a database without our tables."""
    try:
        rows = db.query("SELECT max(version) FROM schema_migrations")
    except DatabaseError:
        return 0
    return int(rows[0][0] or 0)


def migrate(db: Database) -> int:
    """Bring the schema to LATEST; returns the version it was at. Refuses a database newer than this code."""
    types = TYPES[db.dialect]
    with db.transaction():
        if db.dialect == "postgresql":
            db.query("SELECT pg_advisory_xact_lock(hashtext('storelink:migrate'))")  # one migrator at a time
        db.execute(f"CREATE TABLE IF NOT EXISTS schema_migrations (version {types['int']} PRIMARY KEY, "
                   f"description TEXT NOT NULL, applied_at {types['double']} NOT NULL)")
        current = int(db.query("SELECT coalesce(max(version), 0) FROM schema_migrations")[0][0])
        if current > LATEST:
            raise DatabaseError(f"{db.url}: schema version {current} is newer than this storelink knows ({LATEST}); "
                                "upgrade storelink on this machine")
        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                db.execute(statement.format(**types))
            db.execute("INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                       (version, description, time.time()))
    return current
