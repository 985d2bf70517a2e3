"""Batch intake: manifests and chunks from MQTT, checked and reassembled in SQLite.

Order of checks for a manifest: well-formed JSON envelope -> signature present (`unsigned`) -> signature valid with
a trusted key over the canonical bytes (`bad_signature`) -> manifest fields (`malformed`) -> addressed to this
store or one of its groups, on the matching topic (`wrong_target`) -> batch id already committed (`replayed`) ->
version newer than the book and every batch in progress (`stale`) -> size (`too_large`). Chunks are checked
against the SHA-256 the signed manifest lists for them before a byte of them is parsed; a chunk that arrives
before its manifest waits, unverified and bounded, in ``raw_chunks``. Nothing here touches the price book: a
rejected batch leaves the prices in force exactly as they were.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import sqlite3
import time
import zlib
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from storelink import safe_json
from storelink.prices.db import PriceDb, get_meta
from storelink.prices.models import (
    BATCH_ID_RE,
    BURNED,
    FINISHED,
    IN_PROGRESS,
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    ChunkMessage,
    ItemIn,
    Manifest,
    ManifestMessage,
    PricesConfig,
    Reason,
)

log = logging.getLogger(__name__)
_items = TypeAdapter(list[ItemIn])
MAX_DETAIL = 500  # characters of a rejection's detail (it may name fields of the input)


class Rejected(Exception):
    """``signed``: the message passed the signature check (or is a chunk of a signed batch), so its batch id is
    head office's and may be recorded; the id of an unsigned message is only reported, never stored."""

    def __init__(self, reason: Reason, detail: str, batch_id: str | None = None, version: int | None = None,
                 *, signed: bool = False):
        detail = detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 3] + "..."
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.batch_id = batch_id if isinstance(batch_id, str) and re.fullmatch(BATCH_ID_RE, batch_id) else None
        self.version = version
        self.signed = signed


@dataclass(frozen=True)
class Outcome:
    """What one message did: nothing new, a batch became complete, or a batch was rejected."""

    batch_id: str | None = None
    complete: bool = False
    accepted_manifest: bool = False
    duplicate: bool = False


def _loads_object(payload: bytes) -> dict[str, Any]:
    try:
        obj = safe_json.loads(payload, max_bytes=MAX_MESSAGE_BYTES)
    except safe_json.JsonRejected as err:
        reason = Reason.TOO_LARGE if len(payload) > MAX_MESSAGE_BYTES else Reason.MALFORMED
        raise Rejected(reason, f"not JSON: {err.reason}") from None
    if not isinstance(obj, dict):
        raise Rejected(Reason.MALFORMED, "a batch message must be a JSON object")
    return obj


def _brief(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else str(e["msg"]))
    more = f" (+{err.error_count() - 5} more)" if err.error_count() > 5 else ""
    return "; ".join(parts) + more


def decode_chunk(data_b64: str, encoding: str, expected_sha: str, expected_items: int, index: int,
                 batch_id: str) -> list[tuple[Any, ...]]:
    """Check one chunk against the signed manifest and parse its items (CPU work: call from a worker thread)."""
    try:
        raw = base64.b64decode(data_b64, validate=True)
    except binascii.Error:
        raise Rejected(Reason.MALFORMED, f"chunk {index}: data is not base64") from None
    if hashlib.sha256(raw).hexdigest() != expected_sha:
        raise Rejected(Reason.BAD_SIGNATURE, f"chunk {index} does not match the SHA-256 in the signed manifest")
    if encoding == "zlib":
        dec = zlib.decompressobj()
        try:
            body = dec.decompress(raw, MAX_CHUNK_BYTES)
        except zlib.error as err:
            raise Rejected(Reason.MALFORMED, f"chunk {index}: not zlib data: {err}") from None
        if dec.unconsumed_tail:
            raise Rejected(Reason.TOO_LARGE, f"chunk {index} inflates beyond {MAX_CHUNK_BYTES} bytes")
    else:
        body = raw
    try:
        items = _items.validate_json(body)
    except ValidationError as err:
        raise Rejected(Reason.MALFORMED, f"chunk {index}: {_brief(err)}") from None
    if len(items) != expected_items:
        raise Rejected(Reason.MALFORMED, f"chunk {index} holds {len(items)} items, the manifest says {expected_items}")
    # rows, not models: a tuple is a fraction of a pydantic object's size, and this is what SQLite takes
    return [_item_row(batch_id, it) for it in items]


def _item_row(batch_id: str, it: ItemIn) -> tuple[Any, ...]:
    promo = it.promotion.model_dump_json(exclude_none=True) if it.promotion else None
    return (batch_id, it.sku, it.gtin, it.price, it.unit_price, it.unit_basis, it.description, promo)


class Staging:
    def __init__(self, db: PriceDb, cfg: PricesConfig, store_id: str, groups: list[str], keys: list[Any]):
        self.db = db
        self.cfg = cfg
        self.store_id = store_id
        self.groups = set(groups)
        self.keys = keys

    # -- manifests ----------------------------------------------------------------------------------------
    def check_manifest(self, payload: bytes, source: str) -> tuple[Manifest, dict[str, Any]]:
        """Everything that needs no database: envelope, signature, fields, addressee. Raises Rejected."""
        from storelink.remote.signing import SignatureError, verify  # cryptography: imported on first use (idle memory)

        obj = _loads_object(payload)
        env = obj.get("envelope")
        raw_manifest = env.get("payload") if isinstance(env, dict) else None
        guess_id = raw_manifest.get("batch_id") if isinstance(raw_manifest, dict) else None
        guess_id = guess_id if isinstance(guess_id, str) else None
        guess_ver = raw_manifest.get("version") if isinstance(raw_manifest, dict) else None
        guess_ver = guess_ver if isinstance(guess_ver, int) else None
        try:
            msg = ManifestMessage.model_validate(obj)
        except ValidationError as err:
            raise Rejected(Reason.MALFORMED, _brief(err), guess_id, guess_ver) from None
        if not msg.envelope.get("sig"):
            raise Rejected(Reason.UNSIGNED, "the manifest envelope carries no signature", guess_id, guess_ver)
        try:
            signed = verify(msg.envelope, self.keys)
        except SignatureError as err:
            raise Rejected(Reason.BAD_SIGNATURE, err.reason, guess_id, guess_ver) from None
        if not isinstance(signed, dict):
            raise Rejected(Reason.MALFORMED, "the signed payload is not an object", guess_id, guess_ver,
                           signed=True)
        try:
            manifest = Manifest.model_validate(signed)
        except ValidationError as err:
            raise Rejected(Reason.MALFORMED, _brief(err), guess_id, guess_ver, signed=True) from None
        t = manifest.target
        ok = (t.store == self.store_id and source == "store") or (
            t.group in self.groups and source == f"group:{t.group}")
        if not ok:
            who = f"store {t.store}" if t.store else f"group {t.group}"
            raise Rejected(Reason.WRONG_TARGET, f"signed for {who}, received on the {source} topic",
                           manifest.batch_id, manifest.version, signed=True)
        if manifest.item_count > self.cfg.max_items:
            raise Rejected(Reason.TOO_LARGE, f"{manifest.item_count} items, at most {self.cfg.max_items} accepted",
                           manifest.batch_id, manifest.version, signed=True)
        if manifest.not_after is not None and manifest.not_after.timestamp() < time.time():
            raise Rejected(Reason.REPLAYED, f"arrived after its not_after ({manifest.not_after.isoformat()})",
                           manifest.batch_id, manifest.version, signed=True)
        return manifest, signed

    def accept_manifest(self, conn: sqlite3.Connection, m: Manifest, raw: dict[str, Any], source: str) -> Outcome:
        """Writer transaction: replay/stale checks, then record the batch as `staging`. Raises Rejected."""
        row = conn.execute("SELECT phase, manifest FROM batches WHERE batch_id=?", (m.batch_id,)).fetchone()
        if row is not None and row[0] in FINISHED:
            raise Rejected(Reason.REPLAYED, f"batch {m.batch_id} was already {row[0]}", m.batch_id, m.version,
                           signed=True)
        if row is not None and row[0] in IN_PROGRESS:
            if row[1] == json.dumps(raw, sort_keys=True):
                return Outcome(m.batch_id, duplicate=True)  # QoS 1 redelivery or head office resending
            raise Rejected(Reason.REPLAYED, f"batch id {m.batch_id} is already in progress with other content",
                           m.batch_id, m.version, signed=True)
        active = int(get_meta(conn, "active_version", "0") or 0)
        burned = conn.execute(f"SELECT MAX(version) FROM batches WHERE phase IN ({','.join('?' * len(BURNED))})",
                              BURNED).fetchone()[0]
        newest = max(active, int(burned or 0))
        if m.version <= newest:
            raise Rejected(Reason.STALE, f"version {m.version} is not newer than {newest} (active {active})",
                           m.batch_id, m.version, signed=True)
        now = time.time()
        # A newer manifest replaces incomplete older ones (head office moved on); they are dropped quietly.
        for (old_id,) in conn.execute("SELECT batch_id FROM batches WHERE phase='staging' AND version < ?",
                                      (m.version,)).fetchall():
            self.drop(conn, old_id, "superseded", "a newer batch arrived before this one was complete")
        conn.execute(
            "INSERT OR REPLACE INTO batches(batch_id, version, source, manifest, mode, currency, effective_at, "
            "chunks_total, chunks_done, item_count, phase, reason, received_at, updated_at) "
            "VALUES(?,?,?,?,?,?,?,?,0,?, 'staging', NULL, ?, ?)",
            (m.batch_id, m.version, source, json.dumps(raw, sort_keys=True), m.mode, m.currency,
             m.effective_at.timestamp() if m.effective_at else None, len(m.chunks), m.item_count, now, now))
        conn.execute("DELETE FROM staged WHERE batch_id=?", (m.batch_id,))
        conn.execute("DELETE FROM chunk_done WHERE batch_id=?", (m.batch_id,))
        return Outcome(m.batch_id, accepted_manifest=True)

    # -- chunks -------------------------------------------------------------------------------------------
    @staticmethod
    def parse_chunk(payload: bytes) -> ChunkMessage:
        obj = _loads_object(payload)
        try:
            return ChunkMessage.model_validate(obj)
        except ValidationError as err:
            bid = obj.get("batch_id")
            raise Rejected(Reason.MALFORMED, _brief(err), bid if isinstance(bid, str) else None) from None

    def chunk_target(self, conn: sqlite3.Connection, chunk: ChunkMessage) -> tuple[Manifest | None, str | None]:
        """(manifest, phase) of the chunk's batch, or (None, None) when its manifest has not arrived."""
        row = conn.execute("SELECT manifest, phase FROM batches WHERE batch_id=?", (chunk.batch_id,)).fetchone()
        if row is None or row[0] is None:
            return None, None
        return Manifest.model_validate(json.loads(row[0])), str(row[1])

    def park_chunk(self, conn: sqlite3.Connection, chunk: ChunkMessage) -> None:
        """Keep a chunk whose manifest has not arrived yet. Nobody has vouched for these bytes, so they are bounded
        by batches (``max_staged_batches``) and by bytes (``max_parked_bytes``): the oldest are dropped first, and
        a chunk bigger than the whole allowance is refused at once (``too_large``)."""
        size, limit = len(chunk.data), self.cfg.max_parked_bytes
        if size > limit:
            raise Rejected(Reason.TOO_LARGE, f"chunk {chunk.index} of {size} bytes arrived before its manifest; "
                           f"at most {limit} bytes wait for manifests ([prices] max_parked_bytes)", chunk.batch_id)
        now = time.time()
        conn.execute("DELETE FROM raw_chunks WHERE received_at < ?", (now - self.cfg.staging_ttl,))
        conn.execute("INSERT OR REPLACE INTO raw_chunks(batch_id, idx, data, received_at) VALUES(?,?,?,?)",
                     (chunk.batch_id, chunk.index, chunk.data.encode(), now))
        ids = [r[0] for r in conn.execute(
            "SELECT batch_id FROM raw_chunks GROUP BY batch_id ORDER BY MAX(received_at) DESC")]
        for old in ids[self.cfg.max_staged_batches:]:
            conn.execute("DELETE FROM raw_chunks WHERE batch_id=?", (old,))
        total = conn.execute("SELECT COALESCE(SUM(length(data)), 0) FROM raw_chunks").fetchone()[0]
        if total > limit:
            dropped = 0
            oldest_first = conn.execute(
                "SELECT batch_id, idx, length(data) FROM raw_chunks ORDER BY received_at, batch_id, idx").fetchall()
            for batch_id, idx, length in oldest_first:
                if total <= limit:
                    break
                conn.execute("DELETE FROM raw_chunks WHERE batch_id=? AND idx=?", (batch_id, idx))
                total -= length
                dropped += 1
            log.warning("dropped the %d oldest price chunk(s) still waiting for their manifest: over [prices] "
                        "max_parked_bytes (%d)", dropped, limit)

    def take_parked(self, conn: sqlite3.Connection, batch_id: str) -> list[ChunkMessage]:
        rows = conn.execute("SELECT idx, data FROM raw_chunks WHERE batch_id=? ORDER BY idx", (batch_id,)).fetchall()
        conn.execute("DELETE FROM raw_chunks WHERE batch_id=?", (batch_id,))
        return [ChunkMessage(type="chunk", batch_id=batch_id, index=i, data=d.decode()) for i, d in rows]

    def store_chunk(self, conn: sqlite3.Connection, batch_id: str, index: int, rows: list[tuple[Any, ...]],
                    received_at: float) -> bool:
        """Writer transaction: insert a verified chunk's items; True when the batch is now complete."""
        row = conn.execute("SELECT phase, chunks_total FROM batches WHERE batch_id=?", (batch_id,)).fetchone()
        if row is None or row[0] != "staging":
            return False  # dropped or rejected meanwhile
        if conn.execute("SELECT 1 FROM chunk_done WHERE batch_id=? AND idx=?", (batch_id, index)).fetchone():
            return False  # QoS 1 duplicate
        try:
            conn.executemany("INSERT INTO staged(batch_id, sku, gtin, price, unit_price, unit_basis, description, "
                             "promotion) VALUES(?,?,?,?,?,?,?,?)", rows)
        except sqlite3.IntegrityError:
            raise Rejected(Reason.MALFORMED, f"chunk {index} repeats a SKU already in this batch", batch_id) from None
        conn.execute("INSERT INTO chunk_done(batch_id, idx) VALUES(?,?)", (batch_id, index))
        conn.execute("UPDATE batches SET chunks_done = chunks_done + 1, updated_at=?, "
                     "last_chunk_at = MAX(COALESCE(last_chunk_at, 0), ?) WHERE batch_id=?",
                     (time.time(), received_at, batch_id))
        done = conn.execute("SELECT chunks_done, chunks_total FROM batches WHERE batch_id=?", (batch_id,)).fetchone()
        if done[0] >= done[1]:
            conn.execute("UPDATE batches SET phase='staged', staged_at=?, updated_at=? WHERE batch_id=?",
                         (time.time(), time.time(), batch_id))
            conn.execute("DELETE FROM chunk_done WHERE batch_id=?", (batch_id,))
            return True
        return False

    # -- clean-up -----------------------------------------------------------------------------------------
    @staticmethod
    def drop(conn: sqlite3.Connection, batch_id: str, phase: str, reason: str) -> None:
        """Forget a batch's staged data and record why (`rejected`, `superseded`, `expired`)."""
        conn.execute("DELETE FROM staged WHERE batch_id=?", (batch_id,))
        conn.execute("DELETE FROM chunk_done WHERE batch_id=?", (batch_id,))
        conn.execute("DELETE FROM raw_chunks WHERE batch_id=?", (batch_id,))
        conn.execute("UPDATE batches SET phase=?, reason=?, updated_at=? WHERE batch_id=?",
                     (phase, reason, time.time(), batch_id))

    def record_rejection(self, conn: sqlite3.Connection, rej: Rejected, source: str, from_chunk: bool) -> None:
        """Record a rejection. A bad manifest never touches an existing batch of the same id (it may be forged);
        a chunk that fails its signed hash or does not parse ends the batch it belongs to. Only a signed batch
        gets a row of its own: the ids of unsigned messages would let anyone grow the table."""
        if rej.batch_id is None:
            return
        row = conn.execute("SELECT phase FROM batches WHERE batch_id=?", (rej.batch_id,)).fetchone()
        if from_chunk and row is not None and row[0] == "staging":
            self.drop(conn, rej.batch_id, "rejected", f"{rej.reason}: {rej.detail}")
        elif rej.signed:
            now = time.time()
            conn.execute(
                "INSERT INTO batches(batch_id, version, source, phase, reason, received_at, updated_at) "
                "VALUES(?,?,?,'rejected',?,?,?) ON CONFLICT(batch_id) DO NOTHING",
                (rej.batch_id, rej.version, source, f"{rej.reason}: {rej.detail}", now, now))

    def expire(self, conn: sqlite3.Connection) -> list[str]:
        """Drop batches that stayed incomplete longer than staging_ttl; returns their ids."""
        cutoff = time.time() - self.cfg.staging_ttl
        ids = [r[0] for r in conn.execute("SELECT batch_id FROM batches WHERE phase='staging' AND updated_at < ?",
                                          (cutoff,))]
        for bid in ids:
            self.drop(conn, bid, "expired", f"incomplete after {self.cfg.staging_ttl:.0f} s")
        conn.execute("DELETE FROM raw_chunks WHERE received_at < ?", (cutoff,))
        return ids
