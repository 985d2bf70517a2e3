"""The one decode step for untrusted JSON: what it refuses, with which reason, and what it lets through."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storelink import safe_json


@pytest.mark.parametrize(("data", "reason"), [
    (b'{"v":"\\ud800"}', "lone UTF-16 surrogate"),
    (b'{"\\uDFFF":1}', "lone UTF-16 surrogate"),
    (b'{"v":"\xed\xa0\x80"}', "not UTF-8"),
    (b"\xff{}", "not UTF-8"),
    (b"\xef\xbb\xbf{}", "byte order mark"),
    (b'{"v":NaN}', "NaN and Infinity"),
    (b"[-Infinity]", "NaN and Infinity"),
    (b"1e999", "too large for a float"),
    (b"1" * 5000, "too many digits"),
    (b"[" * 33 + b"]" * 33, "nested deeper than 32"),
    (b"[" * 100_000 + b"]" * 100_000, "larger than"),
    (b"[" * 5000 + b"]" * 5000, "nested deeper than 32"),
    (b'{"a":', "Expecting value"),
    ("caf\udce9", "lone UTF-16 surrogate"),
])
def test_refused_with_a_fixed_reason(data: bytes | str, reason: str) -> None:
    with pytest.raises(safe_json.JsonRejected) as err:
        safe_json.loads(data, max_bytes=64 * 1024)
    assert reason in err.value.reason
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("value", [
    {"v": "😀 (an escaped surrogate pair is fine)"}, {"k": [1, 2.5, -0.0, None, True, "größe"]},
    [[[[[[[[[[1]]]]]]]]]], "\u2028", 2**63,
])
def test_good_json_round_trips(value: Any) -> None:
    text = json.dumps(value)
    assert safe_json.loads(text.encode()) == json.loads(text)
    assert safe_json.loads(safe_json.dumps(value)) == json.loads(text)


@pytest.mark.parametrize(("value", "reason"), [
    ({"v": "\ud800"}, "surrogate"), ({"v": float("nan")}, "NaN"), ({"v": b"x"}, "not a JSON value"),
    ({"v": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}, "nested deeper"),
    ("x" * 100, "larger than"),
])
def test_dumps_refuses_what_a_strict_reader_would(value: Any, reason: str) -> None:
    with pytest.raises(safe_json.JsonRejected, match=reason):
        safe_json.dumps(value, max_bytes=50)


@settings(max_examples=300, derandomize=True, database=None)
@given(st.binary(max_size=64) | st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_give_a_value_or_a_rejection(data: bytes) -> None:
    try:
        value = safe_json.loads(data)
    except safe_json.JsonRejected as err:
        assert err.reason and len(err.reason) < 80
    else:
        safe_json.dumps(value)  # whatever is accepted can be written out again


def test_echo_is_bounded_and_ascii() -> None:
    assert safe_json.echo("\ud800" + "x" * 500) == "'\\ud800" + "x" * 54 + "..."
    assert safe_json.echo("ok") == "'ok'"
