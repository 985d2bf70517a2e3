"""The StoreLink till protocol (docs/till-protocol.md): line-delimited JSON over TCP, shared by the gateway's
``till_tcp`` driver and the till simulator.

Every line is one UTF-8 JSON object with a ``type``. Requests carry an ``id`` chosen by the sender; the answer
echoes it as ``re`` with ``type`` ``OK`` or ``ERROR`` (``code`` + ``error``). Both sides send requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from typing import Any

from pydantic import Field

from storelink.validation import StrictModel

PROTOCOL_VERSION = 1
DEFAULT_PORT = 7700
# A till's line is a sale or a lookup: 64 KiB is ~500 sale lines. Longer lines are discarded, not buffered, so a
# misbehaving peer cannot make the gateway hold megabytes.
MAX_LINE = 64 * 1024
HELLO_TIMEOUT = 10.0

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
INTERNAL = "internal"


class ProtocolError(Exception):
    """A line or request the receiver cannot accept; answered with an ERROR carrying ``code``."""

    def __init__(self, code: str, message: str, re: Any = None):
        super().__init__(message)
        self.code = code
        self.re = re  # the id of the request this answers, when known


class LineTooLong(ProtocolError):
    def __init__(self, size: int, limit: int):
        super().__init__(LINE_TOO_LONG, f"line of {size}+ bytes exceeds the limit of {limit} bytes; discarded")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One line -> a message with a string ``type``; ProtocolError(bad_json) otherwise."""
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise ProtocolError(BAD_JSON, f"line is not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        message = json.loads(text)
    except ValueError as err:
        raise ProtocolError(BAD_JSON, f"line is not JSON: {err}") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_JSON, f"a message must be a JSON object, got {type(message).__name__}")
    if not isinstance(message.get("type"), str):
        raise ProtocolError(BAD_JSON, "a message needs a string 'type'")
    return message


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


def item_to_wire(item: Any) -> dict[str, Any]:
    """A PriceItem (drivers.base) as the till protocol carries it."""
    return {
        "sku": item.sku, "gtin": item.gtin, "price": item.price, "unit_price": item.unit_price,
        "unit_basis": item.unit_basis, "description": item.description,
    }
