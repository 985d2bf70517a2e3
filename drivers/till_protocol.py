"""The StoreLink till protocol (docs/till-protocol.md): line-delimited JSON over TCP, shared by the gateway's
``till_tcp`` driver and the till simulator.

Every line is one UTF-8 JSON object with a ``type``. Requests carry an ``id`` chosen by the sender; the answer
echoes it as ``re`` with ``type`` ``OK`` or ``ERROR`` (``code`` + ``error``). Both sides send requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Iterator
from typing import Any

from pydantic import Field

from storelink import safe_json
from storelink.validation import StrictModel

PROTOCOL_VERSION = 2  # 2 adds HOLD / FINAL and PREPARE's transition_price (docs/till-protocol.md)
HOLDS_SINCE = 2  # the first protocol version whose tills keep holds (charge at most the transition prices)
DEFAULT_PORT = 7700
# A till's line is a sale or a lookup: 64 KiB is ~500 sale lines. Longer lines are discarded, not buffered, so a
# misbehaving peer cannot make the gateway hold megabytes.
MAX_LINE = 64 * 1024
HELLO_TIMEOUT = 10.0
MAX_CONNECTIONS = 64  # connections one till port serves at once
MAX_UNIDENTIFIED = 16  # of those, connections that have not completed HELLO (a flood must not lock tills out)

# Error codes (the ``code`` of an ERROR reply); the text in ``error`` is for people.
BAD_JSON = "bad_json"
LINE_TOO_LONG = "line_too_long"
UNKNOWN_TYPE = "unknown_type"
BAD_REQUEST = "bad_request"
NOT_HELLO = "not_hello"
UNKNOWN_TILL = "unknown_till"
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
NO_PRICE_BOOK = "no_price_book"
NOT_STORED = "not_stored"
NOT_STAGED = "not_staged"
BUSY = "busy"
INTERNAL = "internal"


class ProtocolError(Exception):
    """A line or request the receiver cannot accept; answered with an ERROR carrying ``code``.

    The message goes back to the till and may quote its input; ``log_detail`` is what the gateway's log and status
    may show: fixed text, or names of our own fields, never the till's bytes (a sale may hold customer data)."""

    def __init__(self, code: str, message: str, re: Any = None, *, log_detail: str | None = None):
        super().__init__(message)
        self.code = code
        self.re = re  # the id of the request this answers, when known
        self.log_detail = log_detail

    @property
    def loggable(self) -> str:
        return f"{self.code} ({self.log_detail})" if self.log_detail else self.code


class LineTooLong(ProtocolError):
    def __init__(self, size: int, limit: int):
        super().__init__(LINE_TOO_LONG, f"line of {size}+ bytes exceeds the limit of {limit} bytes; discarded")


def encode(message: dict[str, Any]) -> bytes:
    return safe_json.dumps(message) + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One line -> a message with a string ``type`` and a usable ``id``; ProtocolError(bad_json) otherwise. The
    line goes through safe_json: not UTF-8, NaN/Infinity, lone surrogates and deep nesting are bad_json too."""
    try:
        message = safe_json.loads(line, max_bytes=MAX_LINE + 2)
    except safe_json.JsonRejected as err:
        raise ProtocolError(BAD_JSON, f"line is not JSON: {err.reason}", log_detail=err.reason) from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_JSON, f"a message must be a JSON object, got {type(message).__name__}",
                            log_detail="not an object")
    if not isinstance(message.get("type"), str):
        raise ProtocolError(BAD_JSON, "a message needs a string 'type'", log_detail="no type")
    rid = message.get("id")
    if not (rid is None or (isinstance(rid, str) and len(rid) <= 64)
            or (isinstance(rid, int | float) and not isinstance(rid, bool))):
        raise ProtocolError(BAD_REQUEST, "'id' must be a string of at most 64 characters or a number",
                            log_detail="bad id")
    return message


def count_rejection(ctx: Any, code: str) -> None:
    """Count a refused line in the gateway's rejection counters (status and /metrics), when the context lends
    them (the gateway's does; a test's stand-in context need not)."""
    counters = getattr(ctx, "rejections", None)
    if counters is not None:
        counters["till", code] += 1


def short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def read_line(reader: asyncio.StreamReader, limit: int = MAX_LINE) -> bytes | None:
    """The next line (with its newline), None at a clean EOF.

    A line longer than the reader's limit is read through to its newline and thrown away, then LineTooLong is
    raised: the connection stays usable and the next line is read normally.
    """
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as err:
        if err.partial.strip():
            return bytes(err.partial)  # last line without a newline before EOF: still a line
        return None
    except asyncio.LimitOverrunError as err:
        dropped = 0
        pending = err.consumed
        while True:
            chunk = await reader.read(max(pending, 1))
            if not chunk:
                raise LineTooLong(dropped, limit) from None
            dropped += len(chunk)
            try:
                dropped += len(await reader.readuntil(b"\n"))
                raise LineTooLong(dropped, limit) from None
            except asyncio.LimitOverrunError as again:
                pending = again.consumed
            except asyncio.IncompleteReadError as eof:
                dropped += len(eof.partial)
                raise LineTooLong(dropped, limit) from None


def parse_address(value: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` or ``:PORT``; ValueError with a message that says what is wrong."""
    m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", value)
    if not m:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    host, port = m.group(1) or default_host, int(m.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1..65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host must be an IP address or localhost, got {host!r}") from None
    return host, port


# -- what a till sends ------------------------------------------------------------------------------------------


class SaleLine(StrictModel):
    sku: str = Field(min_length=1, max_length=64)
    gtin: str | None = Field(None, pattern=r"^\d{8,14}$")
    description: str | None = Field(None, max_length=200)
    qty: int | float = Field(description="units, or kg/l for weighed items; negative for a return")
    price: int = Field(description="unit price charged, minor units")
    amount: int | None = Field(None, description="line total charged, minor units (after line discounts)")


class Sale(StrictModel):
    """The ``sale`` of a SALE request; becomes the ``data`` of a ``sale`` event (plus ``till_id``)."""

    sale_id: str = Field(min_length=1, max_length=64, description="unique per till; head office's dedup key")
    ts: str | None = Field(None, max_length=40, description="when the till closed the sale (ISO 8601)")
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    total: int = Field(description="amount charged, minor units")
    price_version: int | None = Field(None, ge=0, description="the price version the till charged with")
    lines: list[SaleLine] = Field(min_length=1, max_length=1000)
    payments: list[dict[str, Any]] = Field(default_factory=list, max_length=20,
                                           description="tender type and amount only; never card numbers")
    extra: dict[str, Any] = Field(default_factory=dict, description="POS-specific fields, passed through")


def item_to_wire(item: Any, transition_price: int | None = None) -> dict[str, Any]:
    """A PriceItem (drivers.base) as the till protocol carries it; `transition_price` only for protocol 2."""
    wire = {
        "sku": item.sku, "gtin": item.gtin, "price": item.price, "unit_price": item.unit_price,
        "unit_basis": item.unit_basis, "description": item.description,
    }
    if transition_price is not None:
        wire["transition_price"] = transition_price
    return wire


def iso_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def prepare_messages(change: Any, holds: bool, per_part: int) -> Iterator[dict[str, Any]]:
    """A PriceChange (drivers.base) as the PREPARE parts of at most `per_part` items each; a till that keeps holds
    (protocol 2) is also told each item's `transition_price` and the change's `effective_at`. Each part's wire form
    is built when it is taken: v1 of a 100,000-item book is one part in memory per till, not the book."""
    caps = change.transition_prices
    parts = max(1, -(-len(change.changed) // per_part))
    extra: dict[str, Any] = {}
    if holds:
        extra["effective_at"] = iso_time(change.effective_at) if change.effective_at else None
    for k in range(parts):
        chunk = [item_to_wire(i, caps.get(i.sku) if holds else None)
                 for i in change.changed[k * per_part:(k + 1) * per_part]]
        yield {"type": "PREPARE", "version": change.version, "batch_id": change.batch_id,
               "currency": change.currency, "part": k + 1, "parts": parts, "items": chunk, **extra}


def negotiate(hello: dict[str, Any]) -> int:
    """The protocol both sides speak: the till's `protocol` (1 when absent), at most ours. ProtocolError when it
    is not a positive integer."""
    value = hello.get("protocol", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProtocolError(BAD_REQUEST, "'protocol' must be a positive integer", hello.get("id"))
    return min(value, PROTOCOL_VERSION)
