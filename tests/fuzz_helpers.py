"""Strategies and the runner of the fuzzing suite (tests/test_fuzz.py).

``run_surface`` runs one surface's check on generated input. In CI it runs a fixed number of cases,
derandomized (the same cases every run, so a red run can be repeated exactly); with ``--fuzz-minutes N`` it keeps
going with fresh seeds for that surface's share of N minutes (the nightly run). Inputs that once broke the gateway
are passed as ``regressions`` and run first, every time (Hypothesis ``@example``s).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st

from tests.hostile_helpers import CUSTOMER

T = TypeVar("T")
FUZZ_STATS: dict[str, tuple[int, float]] = {}  # surface -> (cases run, seconds); printed at the end of the run


def run_surface(name: str, strategy: st.SearchStrategy[T], check: Callable[[T], None], *, examples: int,
                minutes: float, regressions: Sequence[T] = ()) -> None:
    calls = 0

    def body(value: T) -> None:
        nonlocal calls
        calls += 1
        check(value)

    def build(seed_value: int | None) -> Callable[[], None]:
        test: Any = given(strategy)(body)
        for r in regressions:
            test = example(r)(test)
        test = settings(max_examples=examples, derandomize=seed_value is None, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck), print_blob=True,
                        phases=[Phase.explicit, Phase.generate, Phase.shrink])(test)
        return seed(seed_value)(test) if seed_value is not None else test  # type: ignore[no-any-return]

    started = time.monotonic()
    try:
        if minutes <= 0:
            build(None)()
        else:
            end = started + minutes * 60
            k = 1
            while time.monotonic() < end:
                build(k)()
                k += 1
    finally:
        FUZZ_STATS[name] = (calls, time.monotonic() - started)


# -- values ------------------------------------------------------------------------------------------------------
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(codec="utf-8"), max_size=6),
    st.sampled_from([CUSTOMER, "", " ", "\x00", "\u2028", "\ufeff", "größe ✓", "🛒", *SURROGATES]),
    st.lists(st.sampled_from(["a", CUSTOMER, *SURROGATES, "\x7f", "\ufffd"]), max_size=4).map("".join),
)
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 2**63, 10**400]), text,
)
json_value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4),
                          max_leaves=20)


def signable(value: Any) -> Any:
    """``value`` with what a signer refuses (lone surrogates, NaN/Infinity) replaced, so it can be signed: a hostile
    head office key is not the threat model, but a signed payload with wrong fields is a path worth fuzzing."""
    if isinstance(value, str):
        return "".join("?" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    if isinstance(value, dict):
        return {signable(k): signable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [signable(v) for v in value]
    return value


def to_json_bytes(value: Any, ascii_only: bool) -> bytes:
    """JSON text as a careless or hostile sender writes it: NaN/Infinity allowed, lone surrogates either as
    escapes (ascii_only) or as their 3-byte (CESU) encoding."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


def encoded(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.tuples(values, st.booleans()).map(lambda t: to_json_bytes(*t))


deep = st.tuples(st.integers(20, 5000), st.sampled_from(["[", "{\"a\":"]), st.sampled_from(["1", "NaN", '"x"'])) \
    .map(lambda t: (t[1] * t[0] + t[2] + ("]" if t[1] == "[" else "}") * t[0]).encode())
tokens = st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"\\u", b"d800", b"NaN",
                                   b"-Infinity", b"1e999", b"0" * 5000, b"true", b"null", b"\xed\xa0\x80", b"\xff",
                                   b"\xef\xbb\xbf", b" ", b"\r", b"\x00", CUSTOMER.encode()]), max_size=30) \
    .map(b"".join)


def mutated(seeds: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A valid document with a few bytes changed, inserted or cut."""
    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(seeds))
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data)))
            op = draw(st.sampled_from(["flip", "insert", "cut"]))
            if op == "flip" and pos < len(data):
                data[pos] = draw(st.integers(0, 255))
            elif op == "insert":
                data[pos:pos] = draw(st.sampled_from([b"\xed\xa0\x80", b"NaN", b"[[[", b"\\ud800", b"\x00", b'"',
                                                      b"}", CUSTOMER.encode()]))
            else:
                del data[pos:pos + draw(st.integers(1, 8))]
        return bytes(data)

    return mutate()


def documents(structured: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """What arrives on a JSON surface: bytes, token soup, deep nesting, any JSON, the surface's own shapes (valid
    and not), and mutations of those shapes."""
    shaped = encoded(structured)
    return st.one_of(st.binary(max_size=200), tokens, deep, encoded(json_value), shaped, shaped, mutated(shaped))
