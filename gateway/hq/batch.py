"""Head-office side of the batch format: a CSV price list -> signed manifest + chunk messages.

Used by ``storelink hq publish-prices``, the tests and the bench, so all three speak exactly what the gateway
checks. CSV columns (header row required, extra columns are an error so a misspelt one is never ignored):

    sku, price                      required; price in minor units (cents) as an integer
    gtin, unit_price, unit_basis, description, promo_label, promo_ends_at, promo_regular_price   optional
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from storelink.prices.models import ItemIn

COLUMNS = ("sku", "gtin", "price", "unit_price", "unit_basis", "description", "promo_label", "promo_ends_at",
           "promo_regular_price")
CHUNK_ITEMS = 5000


class CsvProblems(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems[:5]))
        self.problems = problems


def _int(value: str, column: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    digits = value[1:] if value.startswith("-") else value
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"{column} must be an integer number of minor units (cents), got {value!r}")
    return int(value)


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, values) of each CSV record; CsvProblems for a file that is not CSV text at all."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CsvProblems([f"{path}: not UTF-8 text (invalid byte at offset {err.start})"]) from None
    if "\x00" in text:
        raise CsvProblems([f"{path}: holds NUL bytes: not a text file"])
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # an unterminated quote, a field over csv's size limit
            raise CsvProblems([f"{path}: line {reader.line_num}: not valid CSV ({err})"]) from None
        yield reader.line_num, values


def read_csv(path: Path) -> list[ItemIn]:
    """Every row validated; CsvProblems lists each bad row by line number (all of them, not just the first)."""
    problems: list[str] = []
    items: list[ItemIn] = []
    seen: dict[str, int] = {}
    records = _records(path)
    header = [h.strip() for h in next(records, (0, []))[1]]
    unknown = [h for h in header if h not in COLUMNS]
    missing = [h for h in ("sku", "price") if h not in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if unknown or missing or repeated:
        raise CsvProblems([f"{path}: unknown column(s) {unknown} (known: {', '.join(COLUMNS)})"] * bool(unknown)
                          + [f"{path}: missing column(s) {missing}"] * bool(missing)
                          + [f"{path}: column(s) named twice {repeated}"] * bool(repeated))
    for line, values in records:
        if not any(v.strip() for v in values):
            continue  # a blank line
        if len(values) > len(header):
            problems.append(f"line {line}: {len(values)} values for {len(header)} columns")
            continue
        row = {h: v.strip() for h, v in zip(header, values, strict=False)}
        try:
            promo = None
            if row.get("promo_label") or row.get("promo_ends_at") or row.get("promo_regular_price"):
                promo = {"label": row.get("promo_label", ""), "ends_at": row.get("promo_ends_at") or None,
                         "regular_price": _int(row.get("promo_regular_price", ""), "promo_regular_price")}
            item = ItemIn.model_validate({
                "sku": row.get("sku", ""), "gtin": row.get("gtin") or None,
                "price": _int(row.get("price", ""), "price"),
                "unit_price": _int(row.get("unit_price", ""), "unit_price"),
                "unit_basis": row.get("unit_basis") or None, "description": row.get("description", ""),
                "promotion": promo,
            })
        except ValidationError as err:
            problems += [f"line {line}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
            continue
        except ValueError as err:
            problems.append(f"line {line}: {err}")
            continue
        if item.sku in seen:
            problems.append(f"line {line}: sku {item.sku!r} already on line {seen[item.sku]}")
            continue
        seen[item.sku] = line
        items.append(item)
    if problems:
        raise CsvProblems(problems)
    return items


@dataclass(frozen=True)
class Batch:
    batch_id: str
    version: int
    manifest: dict[str, Any]
    messages: list[bytes]  # the manifest message first, then the chunks in order


def build_batch(items: Iterable[ItemIn | dict[str, Any]], *, version: int, batch_id: str, store: str | None = None,
                group: str | None = None, currency: str = "EUR", key: Any = None, mode: str = "full",
                effective_at: datetime | None = None, chunk_items: int = CHUNK_ITEMS, compress: bool = True,
                not_after: datetime | None = None) -> Batch:
    """Chunk, compress, hash and sign. `key`: an Ed25519 private key (or its text); None builds an unsigned
    batch (only useful to test that gateways reject it)."""
    rows = [i.model_dump(mode="json", exclude_none=True) if isinstance(i, ItemIn) else i for i in items]
    chunk_bodies: list[bytes] = []
    refs: list[dict[str, Any]] = []
    for start in range(0, max(len(rows), 1), chunk_items):
        part = rows[start:start + chunk_items]
        body = json.dumps(part, separators=(",", ":"), ensure_ascii=False).encode()
        data = zlib.compress(body, 6) if compress else body
        chunk_bodies.append(data)
        refs.append({"sha256": hashlib.sha256(data).hexdigest(), "items": len(part)})
    now = datetime.now(UTC)
    manifest: dict[str, Any] = {
        "kind": "prices.manifest", "format": 1, "batch_id": batch_id, "version": version,
        "target": {"store": store} if store else {"group": group}, "mode": mode, "currency": currency,
        "created_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "item_count": len(rows),
        "encoding": "zlib" if compress else "identity", "chunks": refs,
    }
    if effective_at is not None:
        manifest["effective_at"] = effective_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if not_after is not None:
        manifest["not_after"] = not_after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if key is not None:
        from storelink.remote.signing import sign

        envelope = sign(manifest, key)
    else:
        envelope = {"payload": manifest}
    messages = [json.dumps({"type": "manifest", "envelope": envelope}, separators=(",", ":")).encode()]
    for index, data in enumerate(chunk_bodies):
        messages.append(json.dumps({"type": "chunk", "batch_id": batch_id, "index": index,
                                    "data": base64.b64encode(data).decode()}, separators=(",", ":")).encode())
    return Batch(batch_id, version, manifest, messages)
