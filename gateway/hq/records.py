"""What each store message becomes in head office's database (the write side of `storelink hq ingest`).

A message is parsed into an event row, a retained-state row, a piece of a published price batch, or a bad
message (kept with the reason, never dropped silently). `write_batch` commits one batch of them in one
transaction; only after it returned does the ingest acknowledge those messages to the broker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from storelink import safe_json
from storelink.hq.db import Database

RETAINED_TOPICS = ("status", "prices/state", "outbox/state", "config/reported")
MAX_ID = 64
BAD_PAYLOAD_HEAD = 200  # bytes of a bad message kept for whoever investigates


@dataclass(slots=True)
class Inbound:
    """One message as paho handed it over, with what the ingest needs to acknowledge it later."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # the connection it came on: a mid means nothing on the next connection
    retain: bool = False  # the broker's retained copy (sent on subscribe), not a message the store just sent
    received_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class Parsed:
    events: list[tuple[Any, ...]] = field(default_factory=list)
    retained: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)  # the newest per key wins
    bad: list[tuple[str, str, str, float]] = field(default_factory=list)
    stores: set[str] = field(default_factory=set)


def parse_ts(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _event_row(store: str, kind: str, body: Any, received_at: float) -> tuple[Any, ...] | str:
    """The events row, or why the message is not an event (the contract's EventPayload, checked by hand
    because this runs for every message: ~4x cheaper than a model)."""
    if not isinstance(body, dict):
        return "not a JSON object"
    event_id, seq, ts = body.get("id"), body.get("seq"), parse_ts(body.get("ts"))
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_ID:
        return "no valid id"
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "no valid seq"
    if ts is None:
        return "no valid ts"
    if body.get("kind") != kind:
        return f"kind {safe_json.echo(body.get('kind'))} does not match the topic"
    device, data = body.get("device"), body.get("data")
    if not isinstance(device, str) or not isinstance(data, dict):
        return "device or data missing"
    return (event_id, store, seq, kind, device, ts, received_at, safe_json.dumps_text(data))


def decode_payload(payload: bytes, max_bytes: int = safe_json.MAX_BYTES) -> Any:
    """A store's payload through the gateway's one decode step (safe_json: no NaN, lone surrogates, runaway
    nesting), and no NUL anywhere: PostgreSQL stores none in text or jsonb, so one such message would fail its
    whole batch's commit, which would be retried for ever."""
    body = safe_json.loads(payload, max_bytes=max_bytes)
    if b"\\u0000" in payload and _holds_nul(body):  # JSON text can only spell a NUL as that escape
        raise safe_json.JsonRejected("a string holds a NUL character")
    return body


def _holds_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def parse(messages: list[Inbound], prefix: str, worker: str) -> Parsed:
    out = Parsed()
    for m in messages:
        parts = m.topic.split("/")
        if len(parts) < 3 or parts[0] != prefix or parts[1] == "groups":
            out.bad.append((m.topic, "not a store topic", _head(m.payload), m.received_at))
            continue
        store, rest = parts[1], "/".join(parts[2:])
        is_event = parts[2] == "events" and len(parts) == 4
        is_retained = rest in RETAINED_TOPICS or (parts[2] == "devices" and len(parts) == 5 and parts[4] == "state")
        if not is_event and not is_retained:
            out.bad.append((m.topic, "not a topic head office ingests", _head(m.payload), m.received_at))
            continue
        if is_retained and not m.payload:  # a cleared retained message: the state is gone
            out.retained[(store, rest)] = (store, rest, worker, None, m.received_at, _live(m))
            out.stores.add(store)
            continue
        try:
            body = decode_payload(m.payload)
        except safe_json.JsonRejected as err:
            out.bad.append((m.topic, f"not JSON: {err.reason}", _head(m.payload), m.received_at))
            continue
        if is_event:
            row = _event_row(store, parts[3], body, m.received_at)
            if isinstance(row, str):
                out.bad.append((m.topic, row, _head(m.payload), m.received_at))
                continue
            out.events.append(row)
        elif isinstance(body, dict):
            out.retained[(store, rest)] = (store, rest, worker, safe_json.dumps_text(body),
                                           m.received_at, _live(m))
        else:
            out.bad.append((m.topic, "not a JSON object", _head(m.payload), m.received_at))
            continue
        out.stores.add(store)
    return out


def _live(m: Inbound) -> float | None:
    return None if m.retain else m.received_at


def _head(payload: bytes) -> str:
    # Storable in any text column: undecodable bytes and NUL (which PostgreSQL refuses) become U+FFFD.
    return payload[:BAD_PAYLOAD_HEAD].decode("utf-8", errors="replace").replace("\x00", "\ufffd")


EVENT_COLUMNS = ("id", "store_id", "seq", "kind", "device", "ts", "received_at", "data")
UPSERT_RETAINED = ("INSERT INTO retained (store_id, topic, worker, payload, received_at, live_at) "
                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (store_id, topic, worker) DO UPDATE SET "
                   "payload = excluded.payload, received_at = excluded.received_at, "
                   "live_at = coalesce(excluded.live_at, retained.live_at)")


def write_batch(db: Database, parsed: Parsed, worker: str, known_stores: set[str]) -> int:
    """Insert one batch; returns how many events were new (the rest were duplicates). Call inside a transaction."""
    # Sorted by id: two workers landing the same event twice (a store's resend after a reconnect) lock the ids in
    # the same order, so they wait for each other instead of deadlocking.
    inserted = db.insert_ignore("events", EVENT_COLUMNS, "id", sorted(parsed.events))
    new_stores = sorted(parsed.stores - known_stores)  # sorted: two workers never lock in opposite orders
    if new_stores:
        now = time.time()
        db.executemany("INSERT INTO stores (store_id, first_seen) VALUES (?, ?) ON CONFLICT (store_id) DO NOTHING",
                       [(s, now) for s in new_stores])
    if parsed.retained:
        db.executemany(UPSERT_RETAINED, [parsed.retained[k] for k in sorted(parsed.retained)])
    if parsed.bad:
        db.executemany("INSERT INTO bad_messages (topic, reason, payload_head, received_at, worker) "
                       "VALUES (?, ?, ?, ?, ?)", [(t, r, h, at, worker) for t, r, h, at in parsed.bad])
    return inserted
