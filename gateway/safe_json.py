"""The one decode/validate step for untrusted JSON and text, used at every boundary of the gateway.

HTTP bodies, MQTT downlink payloads, till protocol lines, state files and signed envelopes all come in as bytes
that an attacker or a broken device may have written. ``loads`` turns any bytes into either a JSON value that
every later step can store, sign, log and send on without a surprise, or a :class:`JsonRejected` whose
``reason`` is a short fixed text that is safe to log (it never quotes the input). Refused, each with its reason:

- bytes that are not UTF-8 (also the CESU/"WTF-8" encoding of a surrogate, ``ED A0 80``), and a BOM;
- a lone UTF-16 surrogate written as an escape (``"\\ud800"``): it decodes to a Python string that cannot be
  encoded as UTF-8, which is what killed the outbox writer once;
- ``NaN``, ``Infinity`` and numbers too large for a float (``1e999``): not JSON, and not comparable;
- integers longer than Python's conversion limit, nesting deeper than ``max_depth`` (a RecursionError
  otherwise) and documents larger than ``max_bytes``.

``dumps`` is the strict encoder for what the gateway writes (events, replies, state files): it refuses the same
things instead of producing text a strict reader at head office would refuse.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 32  # nesting of objects/arrays; an event's data, a sale, a config or a manifest needs far less
MAX_BYTES = 1024 * 1024  # default bound of one document; callers with bigger documents pass their own

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonRejected(ValueError):
    """Input that is not acceptable JSON. ``reason`` is fixed text (never a piece of the input): log it freely."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _refuse_constant(_name: str) -> Any:
    raise JsonRejected("NaN and Infinity are not JSON numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRejected("a number is too large for a float")
    return value


def _check_tree(value: Any, max_depth: int, strings: bool) -> None:
    """Depth (and with ``strings`` lone surrogates in keys and strings) without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                raise JsonRejected(f"nested deeper than {max_depth} levels")
            for key, item in node.items():
                if strings and isinstance(key, str) and _SURROGATE.search(key):
                    raise JsonRejected("a key holds a lone UTF-16 surrogate")
                if isinstance(item, dict | list | tuple) or (strings and isinstance(item, str)):
                    stack.append((item, depth + 1))
        elif isinstance(node, list | tuple):
            if depth > max_depth:
                raise JsonRejected(f"nested deeper than {max_depth} levels")
            stack.extend((item, depth + 1) for item in node
                         if isinstance(item, dict | list | tuple) or (strings and isinstance(item, str)))
        elif strings and isinstance(node, str) and _SURROGATE.search(node):
            raise JsonRejected("a string holds a lone UTF-16 surrogate")


def loads(data: bytes | bytearray | memoryview | str, *, max_bytes: int = MAX_BYTES,
          max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON; JsonRejected (a ValueError) for anything the gateway could not safely keep."""
    if len(data) > max_bytes:
        raise JsonRejected(f"larger than {max_bytes} bytes")
    if isinstance(data, str):
        text = data
        if _SURROGATE.search(text):
            raise JsonRejected("text holds a lone UTF-16 surrogate")
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise JsonRejected(f"not UTF-8 (invalid byte at offset {err.start})") from None
    if text.startswith("\ufeff"):
        raise JsonRejected("starts with a byte order mark")
    try:
        value = _decode(text)
    except JsonRejected:
        raise
    except RecursionError:
        raise JsonRejected(f"nested deeper than {max_depth} levels") from None
    except ValueError as err:  # JSONDecodeError, and int conversion beyond sys.get_int_max_str_digits()
        if isinstance(err, json.JSONDecodeError):
            raise JsonRejected(f"{err.msg} at offset {err.pos}") from None
        raise JsonRejected("a number has too many digits") from None
    # The tree walk is only needed when the text could break a rule: more brackets than levels allowed, or an
    # escape that may be a surrogate. A typical event has neither and costs no walk at all.
    deep = text.count("{") + text.count("[") > max_depth
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    if deep or surrogates:
        _check_tree(value, max_depth, surrogates)
    return value


def message_object(payload: bytes | bytearray, *, empty_as_object: bool = False) -> dict[str, Any] | None:
    """A received MQTT message that should hold a JSON object: the object, or None for anything else (unsafe or
    broken JSON, another JSON value), which a receiver that only listens drops. An empty payload (a retained
    topic cleared) is None, or ``{}`` with ``empty_as_object``."""
    if not payload:
        return {} if empty_as_object else None
    try:
        body = loads(payload)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def check_value(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Raise JsonRejected when ``value`` (built in Python) is nested deeper than ``max_depth``."""
    _check_tree(value, max_depth, strings=False)


def dumps_text(value: Any, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> str:
    """Compact JSON text that is valid UTF-8 when encoded; JsonRejected for NaN/Infinity, lone surrogates,
    non-JSON types, nesting deeper than ``max_depth`` and more than ``max_bytes`` (as UTF-8)."""
    try:
        text = _encode(value)
        if text.count("{") + text.count("[") > max_depth:  # only then can it be too deep: walk it to know
            check_value(value, max_depth=max_depth)
    except JsonRejected:
        raise
    except RecursionError:
        raise JsonRejected(f"nested deeper than {max_depth} levels") from None
    except ValueError:
        raise JsonRejected("NaN and Infinity are not JSON numbers") from None
    except TypeError as err:
        raise JsonRejected(f"not a JSON value ({type(err).__name__})") from None
    ascii_only = text.isascii()  # the common case: no surrogate possible, and chars are bytes
    if not ascii_only and _SURROGATE.search(text):
        raise JsonRejected("a string holds a lone UTF-16 surrogate")
    if max_bytes is not None and len(text) > (max_bytes if ascii_only else max_bytes // 4) \
            and (ascii_only or len(text.encode("utf-8")) > max_bytes):
        raise JsonRejected(f"larger than {max_bytes} bytes")
    return text


def dumps(value: Any, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> bytes:
    """``dumps_text`` as UTF-8 bytes."""
    return dumps_text(value, max_bytes=max_bytes, max_depth=max_depth).encode("utf-8")


# One encoder and one decoder object: json.dumps()/loads() with options build a new one on every call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_decode = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode


def text_ok(text: str) -> bool:
    """True when ``text`` can be encoded as UTF-8 (no lone surrogates, e.g. from a surrogateescape'd header)."""
    return _SURROGATE.search(text) is None


def echo(value: object, limit: int = 64) -> str:
    """A bounded, ASCII-only quote of an input value for an error message sent back to its sender (not for
    logs): a surrogate or a control character becomes an escape, and a megabyte of it becomes ``limit`` chars."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
