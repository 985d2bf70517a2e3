"""Every price batch head office published, in the database the compliance check reads.

Two ways in, one record (the batch id is the key, so recording twice is harmless):
- `storelink hq publish-prices` records the batch it is about to publish (`record_batch`).
- The ingest also listens to the downlink price topics and assembles what it sees (`BatchAssembler`), so a batch
  published by another tool (a PIM integration, the demo) is checked against too. It verifies every chunk against
  the manifest's SHA-256, and the signature when it is given the trusted keys; an unsigned batch is never
  recorded (no store would apply it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from storelink.hq.config import HqConfig
from storelink.hq.db import DEFAULT_DATABASE, Database, DatabaseError, open_database
from storelink.hq.records import Inbound, decode_payload, parse_ts

log = logging.getLogger(__name__)
MAX_CHUNK = 8 * 1024 * 1024  # what the gateway accepts inflated
ASSEMBLY_TTL = 600.0  # seconds an incomplete batch is held (its messages stay unacknowledged meanwhile)


def record_batch(db: Database, manifest: dict[str, Any], items: Sequence[dict[str, Any]], *, source: str,
                 key_id: str | None, published_at: float | None = None) -> bool:
    """Record a batch and its items in one transaction; False when it was recorded before."""
    target = manifest.get("target") or {}
    with db.transaction():
        new = db.execute(
            "INSERT INTO price_batches (batch_id, version, target_store, target_group, mode, currency, effective_at, "
            "published_at, item_count, key_id, source, manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (batch_id) DO NOTHING",
            (manifest["batch_id"], int(manifest["version"]), target.get("store"), target.get("group"),
             manifest.get("mode", "full"), manifest.get("currency"), parse_ts(manifest.get("effective_at")),
             published_at or time.time(), len(items), key_id, source, json.dumps(manifest)))
        if new:
            db.executemany("INSERT INTO price_items (batch_id, sku, gtin, price) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (batch_id, sku) DO NOTHING",
                           [(manifest["batch_id"], str(i["sku"]), i.get("gtin"), int(i["price"])) for i in items])
    return bool(new)


def record_published(cfg: HqConfig, batch: Any, items: Sequence[Any]) -> str:
    """`hq publish-prices`, once the broker took every message: record the batch; returns what to tell the user.

    The database: hq.toml's [database] (or --database), else the pilot's default file if it exists here.
    Without one the batch is still recorded by a running `hq ingest`, which sees it on the downlink topics."""
    from pathlib import Path

    url = cfg.database_url
    if url is None and Path(DEFAULT_DATABASE.removeprefix("sqlite:///")).exists():
        url = DEFAULT_DATABASE
    if url is None:
        return ("not recorded here (no [database] in hq.toml, no --database); a running `storelink hq ingest` "
                "records it from the broker")
    rows = [i.model_dump(mode="json", exclude_none=True) if hasattr(i, "model_dump") else i for i in items]
    key_id = json.loads(batch.messages[0]).get("envelope", {}).get("key_id")
    try:
        db = open_database(url, password=cfg.database_password())
        try:
            from storelink.hq.schema import migrate

            migrate(db)
            new = record_batch(db, batch.manifest, rows, source="publish-prices", key_id=key_id)
        finally:
            db.close()
    except DatabaseError as err:
        return f"NOT recorded for price compliance: {err} (a running `storelink hq ingest` still records it)"
    where = url.rpartition("@")[2] if url.startswith("postgres") else url
    return f"recorded in {where} for price compliance" + ("" if new else " (it was already)")


@dataclass
class _Assembly:
    first_seen: float
    messages: list[Inbound] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    key_id: str | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Assembled:
    manifest: dict[str, Any]
    items: list[dict[str, Any]]
    key_id: str | None
    messages: list[Inbound]  # acknowledge these once the batch is committed


class BatchAssembler:
    """Manifest + chunks (in any order) -> one verified batch. Not thread-safe: the ingest's writer owns it."""

    def __init__(self, trusted_keys: Sequence[Any] = ()):
        self.trusted = list(trusted_keys)
        self._open: dict[str, _Assembly] = {}

    def add(self, m: Inbound) -> tuple[Assembled | None, list[tuple[Inbound, str]]]:
        """Feed one downlink message. Returns a completed batch (if this message completed one) and messages that
        are done with and must be acknowledged without a record, each with why (logged and kept as bad)."""
        try:
            body = decode_payload(m.payload)  # nothing PostgreSQL cannot store gets as far as a record
            kind = body["type"]
            batch_id = body["envelope"]["payload"]["batch_id"] if kind == "manifest" else body["batch_id"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return None, [(m, "not a price batch message")]
        if not isinstance(batch_id, str):
            return None, [(m, "batch_id is not text")]
        asm = self._open.setdefault(batch_id, _Assembly(time.monotonic()))
        asm.messages.append(m)
        if kind == "manifest":
            problem = self._take_manifest(asm, body["envelope"])
            if problem:
                del self._open[batch_id]
                return None, [(msg, problem) for msg in asm.messages]
        elif kind == "chunk":
            try:
                asm.chunks[int(body["index"])] = base64.b64decode(body["data"], validate=True)
            except (KeyError, ValueError, TypeError, binascii.Error):
                asm.messages.pop()
                return None, [(m, "chunk without a valid index and base64 data")]
        else:
            asm.messages.pop()
            return None, [(m, f"unknown batch message type {kind!r}")]
        return self._complete(batch_id, asm)

    def _take_manifest(self, asm: _Assembly, envelope: Any) -> str | None:
        if not isinstance(envelope, dict) or not envelope.get("sig"):
            return "unsigned batch: no store applies it, not recorded"
        if self.trusted:
            from storelink.remote.signing import SignatureError, verify

            try:
                verify(envelope, self.trusted)
            except SignatureError as err:
                return f"batch signature not trusted: {err}"
        manifest = envelope.get("payload")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("chunks"), list) \
                or not isinstance(manifest.get("version"), int):
            return "manifest without chunks or version"
        asm.manifest, asm.key_id = manifest, envelope.get("key_id")
        return None

    def _complete(self, batch_id: str, asm: _Assembly) -> tuple[Assembled | None, list[tuple[Inbound, str]]]:
        if asm.manifest is None or len(asm.chunks) < len(asm.manifest["chunks"]):
            return None, []
        del self._open[batch_id]
        items: list[dict[str, Any]] = []
        try:
            for index, ref in enumerate(asm.manifest["chunks"]):
                data = asm.chunks[index]
                if hashlib.sha256(data).hexdigest() != ref["sha256"]:
                    raise ValueError(f"chunk {index} does not match its SHA-256 in the manifest")
                if asm.manifest.get("encoding") == "zlib":
                    data = zlib.decompressobj().decompress(data, MAX_CHUNK)
                part = decode_payload(data, MAX_CHUNK)
                if not isinstance(part, list) or not all(isinstance(i, dict) and "sku" in i and "price" in i
                                                         for i in part):
                    raise ValueError(f"chunk {index} is not a list of items")
                items.extend(part)
        except (KeyError, ValueError, TypeError, zlib.error) as err:
            return None, [(m, f"batch {batch_id}: {err}") for m in asm.messages]
        return Assembled(asm.manifest, items, asm.key_id, asm.messages), []

    def expire(self) -> list[tuple[Inbound, str]]:
        """Batches that never completed within ASSEMBLY_TTL: their messages, to acknowledge and report."""
        now = time.monotonic()
        out: list[tuple[Inbound, str]] = []
        for batch_id in [b for b, a in self._open.items() if now - a.first_seen > ASSEMBLY_TTL]:
            asm = self._open.pop(batch_id)
            have = f"{len(asm.chunks)} of {len(asm.manifest['chunks'])} chunks" if asm.manifest else "no manifest"
            out += [(m, f"batch {batch_id} incomplete after {ASSEMBLY_TTL:.0f} s ({have})") for m in asm.messages]
        return out

    def holding(self) -> int:
        return sum(len(a.messages) for a in self._open.values())
