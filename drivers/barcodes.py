"""What a scanned barcode means: GTIN check digits, GS1 application identifiers, in-store variable-measure codes.

Shared by every scanner driver (serial, HID). The decoding is biip's; this module decides what counts as a good
scan and turns it into the JSON of a ``scan`` event. A bad scan is never an exception: it becomes
``{"valid": false, "reason": ...}`` so head office sees misreads, and the raw bytes of noise are never included
(they are unreadable in a log and could be anything, including a customer's data from a mis-wired device).

Rules, in order:

1. Only printable ASCII and the GS1 group separator (0x1D) are barcode text; anything else is ``garbled``.
2. An AIM symbology identifier (``]E0``, ``]C1``...) says how to read the rest. EAN/UPC/ITF-14 symbols and,
   without an identifier, any all-digit 8/12/13/14-character code must be a GTIN with a correct check digit
   (``bad_check_digit`` otherwise) - a misread EAN must not slip through as "some other code".
3. GS1 symbologies (GS1-128, GS1 DataMatrix, GS1 QR, DataBar) must hold a valid GS1 element string.
4. Restricted-circulation GTINs (prefix 20-29: in-store weighed or priced items) are split with the store's
   layout (``rcn_layouts``), or the national rules biip knows (``rcn_region``).
5. Anything else printable (Code 39 item codes, plain QR text) is a ``text`` scan if ``allow_text``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from storelink.drivers.base import DeviceContext, Health
from storelink.system.logs import exception_summary
from storelink.validation import StrictModel

# biip costs about 20 MB of RSS: it is imported when a scanner warms up or interprets its first scan (or a scanner's
# config names an RCN region), not when check-config imports a scanner driver to validate its table.
if TYPE_CHECKING:
    from biip.gtin import Gtin
    from biip.symbology import GS1Symbology, ISOSymbology

log = logging.getLogger(__name__)
GS = "\x1d"
_PRINTABLE_RE = re.compile(r"[\x20-\x7e\x1d]*")
_GTIN_LENGTHS = (8, 12, 13, 14)

Reason = Literal["garbled", "overlong", "unterminated", "bad_check_digit", "invalid_gtin", "invalid_gs1",
                 "bad_measure_check_digit", "unrecognised", "missing_prefix", "unmapped_key"]


class RcnLayout(StrictModel):
    """How a store's scales print variable-measure codes (GS1 prefixes 20-29) into a GTIN-13.

    ``pattern`` covers the first 12 digits of the GTIN-13 (the 13th is the GTIN check digit): ``P`` is the
    prefix and item reference, ``C`` the price/weight check digit (optional), ``V`` the value. For example
    ``"PPPPPPPCVVVV"`` is a 2-digit prefix, 5-digit item, a check digit and a 4-digit price.
    """

    prefixes: list[str] = Field(min_length=1, description='two-digit GS1 prefixes, "20".."29"')
    pattern: str = Field(pattern=r"^P{3,}C?V{2,}$", min_length=12, max_length=12)
    measure: Literal["price", "weight", "count"]
    decimals: int = Field(2, ge=0, le=5)

    @field_validator("prefixes")
    @classmethod
    def _two_digits_20_29(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"2[0-9]", p):
                raise ValueError(f"prefix {p!r} is not a restricted-circulation prefix 20..29")
        return v

    @field_validator("pattern")
    @classmethod
    def _check_digit_needs_4_or_5(cls, v: str) -> str:
        if "C" in v and v.count("V") not in (4, 5):
            raise ValueError("a price/weight check digit (C) is defined for 4 or 5 value digits only")
        return v


class BarcodeConfig(StrictModel):
    """Barcode interpretation settings every scanner driver shares (mixed into its config model)."""

    rcn_region: str | None = Field(
        None, description="country whose variable-measure rules biip applies (dk, de, gb, no, se, ...)"
    )
    rcn_layouts: list[RcnLayout] = Field(default_factory=list, description="the store's own layouts (win)")
    allow_text: bool = Field(True, description="accept non-GS1 printable codes (Code 39 item codes, QR text)")
    max_length: int = Field(512, ge=16, le=65536, description="longest scan in bytes; longer is `overlong`")

    @field_validator("rcn_region")
    @classmethod
    def _known_region(cls, v: str | None) -> str | None:
        from biip.rcn import RcnRegion

        if v is not None and v not in {r.value for r in RcnRegion}:
            known = ", ".join(sorted(r.value for r in RcnRegion))
            raise ValueError(f"unknown RCN region {v!r} (biip knows: {known})")
        return v


def warm_up() -> None:
    """Import biip and parse once (blocking, ~40 ms here): a scanner driver calls it in a thread at start so its
    first scan is not the one that pays for the import on the event loop."""
    interpret("]E05901234123457", BarcodeConfig.model_validate({}))


def invalid(reason: Reason, detail: str, length: int, aim: str | None = None) -> dict[str, Any]:
    return {"valid": False, "reason": reason, "detail": detail, "length": length, "aim": aim}


def _num(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _symbology_name(iso: ISOSymbology, gs1: GS1Symbology | None) -> str:
    return (gs1 or iso).name.replace("_", "-")


def _apply_layout(gtin: Gtin, layout: RcnLayout) -> dict[str, Any] | str:
    """The variable-measure fields of ``gtin`` under ``layout``, or an error message."""
    from biip.checksums import gs1_price_weight_check_digit

    digits = gtin.as_gtin_13()[:12]
    p = layout.pattern
    value = "".join(d for d, m in zip(digits, p, strict=True) if m == "V")
    if "C" in p:
        expected = gs1_price_weight_check_digit(value)
        got = int(digits[p.index("C")])
        if expected != got:
            return f"price/weight check digit of {gtin.value}: expected {expected}, got {got}"
    item = "".join(d for d, m in zip(digits, p, strict=True) if m == "P")[2:]
    measure = Decimal(value) / Decimal(10) ** layout.decimals
    return {"item_reference": item, layout.measure: str(measure) if layout.measure != "count" else int(measure)}


def interpret(text: str, config: BarcodeConfig) -> dict[str, Any]:
    """The ``scan`` event data for one decoded barcode text (already stripped of framing). Whatever the text, a
    result: biip fails on some malformed input (a lone "]" raised IndexError), and one bad read must cost one
    invalid scan, never the scanner's driver."""
    try:
        return _interpret(text, config)
    except Exception as err:
        log.error("scan interpretation failed: %s", exception_summary(err))
        return invalid("unrecognised", "not parseable as a barcode", len(text))


def _interpret(text: str, config: BarcodeConfig) -> dict[str, Any]:
    from biip import ParseConfig, ParseError, parse
    from biip.symbology import GS1Symbology

    length = len(text)
    if not _PRINTABLE_RE.fullmatch(text):
        bad = sum(1 for ch in text if not _PRINTABLE_RE.fullmatch(ch))
        return invalid("garbled", f"{bad} of {length} characters are not barcode text", length)
    if text.startswith("]") and len(text) < 3:  # an AIM prefix is "]" plus two characters (biip fails on "]")
        return invalid("unrecognised", "malformed symbology identifier (AIM prefix)", length)
    aim: str | None = None
    iso: ISOSymbology | None = None
    gs1_sym: GS1Symbology | None = None
    data = text
    try:
        result = parse(text, config=ParseConfig(rcn_region=config.rcn_region,
                                                rcn_verify_variable_measure=True))
    except ParseError:  # a malformed symbology identifier; biip's text quotes the scan, the detail does not
        return invalid("unrecognised", "malformed symbology identifier (AIM prefix)", length)
    if result.symbology_identifier is not None:
        aim = result.symbology_identifier.value
        iso = result.symbology_identifier.iso_symbology
        gs1_sym = result.symbology_identifier.gs1_symbology
        data = text[len(aim):]
    out: dict[str, Any] = {"valid": True, "code": data, "aim": aim,
                           "symbology": _symbology_name(iso, gs1_sym) if iso else None}

    gtin_like = data.isdigit() and len(data) in _GTIN_LENGTHS
    if gs1_sym in GS1Symbology.with_gtin() or (iso is None and gtin_like):
        if result.gtin is None:
            error = result.gtin_error or "not a GTIN"
            if "check digit for variable measure" in error:
                return invalid("bad_measure_check_digit", error, length, aim)
            reason: Reason = "bad_check_digit" if "check digit" in error else "invalid_gtin"
            return invalid(reason, error, length, aim)
        fields = _gtin_fields(result.gtin, config)
        return fields | {"aim": aim} if fields.get("valid") is False else out | fields

    if gs1_sym in GS1Symbology.with_gs1_messages() or (iso is None and result.gs1_message is not None and length > 14):
        if result.gs1_message is None:
            return invalid("invalid_gs1", result.gs1_message_error or "not a GS1 element string", length, aim)
        for es in result.gs1_message.element_strings:
            # biip keeps an element whose embedded GTIN/SSCC/GLN has a wrong check digit; we do not.
            es_error = es.gtin_error or es.sscc_error or es.gln_error
            if es_error:
                es_reason: Reason = "bad_check_digit" if "check digit" in es_error else "invalid_gs1"
                return invalid(es_reason, f"AI ({es.ai.ai}): {es_error}", length, aim)
        ais = {es.ai.ai: es.value for es in result.gs1_message.element_strings}
        out |= {"type": "gs1", "ai": ais}
        if result.gtin is not None:
            out["gtin"] = result.gtin.value
            out["gtin_format"] = result.gtin.format.name.replace("_", "-")
        return out

    if not config.allow_text:
        return invalid("unrecognised", "not a GTIN or GS1 code and text codes are not allowed", length, aim)
    return out | {"type": "text"}


def _gtin_fields(gtin: Gtin, config: BarcodeConfig) -> dict[str, Any]:
    from biip.rcn import Rcn, RcnUsage

    fields: dict[str, Any] = {"type": "gtin", "gtin": gtin.value,
                              "gtin_format": gtin.format.name.replace("_", "-")}
    if not isinstance(gtin, Rcn) or gtin.usage != RcnUsage.GEOGRAPHICAL:
        return fields
    fields["type"] = "rcn"
    assert gtin.prefix is not None  # an Rcn is classified by its prefix
    layout = next((lay for lay in config.rcn_layouts if gtin.prefix.value[:2] in lay.prefixes), None)
    if layout is not None:
        measure = _apply_layout(gtin, layout)
        if isinstance(measure, str):
            return invalid("bad_measure_check_digit", measure, len(gtin.value))
        fields["rcn"] = measure
    elif gtin.region is not None:
        rcn: dict[str, Any] = {"item_reference": gtin.item_reference, "region": gtin.region.value}
        for name in ("price", "weight"):
            if getattr(gtin, name) is not None:
                rcn[name] = _num(getattr(gtin, name))
        if gtin.count is not None:
            rcn["count"] = gtin.count
        fields["rcn"] = rcn
    return fields


DEGRADED_AFTER = 5  # rejected scans in a row before the scanner's health says so


class ScanReporter:
    """Turns a scanner's frames into ``scan`` events; logs rejected scans without their bytes, rate-limited.

    A scanner pointed at a noisy line can produce hundreds of garbled frames a second: each one is still an
    event (telemetry, evictable), but the log gets at most ``log_per_minute`` lines and then a count, so an SD
    card is not worn out by a loose cable.
    """

    def __init__(self, ctx: DeviceContext, logger: logging.Logger, log_per_minute: int = 20):
        self.ctx = ctx
        self.log = logger
        self.log_per_minute = log_per_minute
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0
        self.counts: dict[str, int] = {"valid": 0, "invalid": 0}
        self.rejected_in_a_row = 0

    async def report(self, results: list[dict[str, Any]]) -> None:
        if not results:
            return
        self.ctx.seen()
        for r in results:
            self.counts["valid" if r["valid"] else "invalid"] += 1
            if not r["valid"]:
                self._log_rejected(r)
            self.rejected_in_a_row = 0 if r["valid"] else self.rejected_in_a_row + 1
        # One bad read is a customer's crumpled label; a run of them is a wrong baud rate, framing or keymap.
        if self.rejected_in_a_row >= DEGRADED_AFTER:
            self.ctx.set_health(Health.DEGRADED, f"{self.rejected_in_a_row} rejected scans in a row (last: "
                                                 f"{results[-1]['reason']}): check baud rate, framing or keymap")
        elif results[-1]["valid"]:
            self.ctx.set_health(Health.OK)
        # All frames read together are put together, so they share one outbox commit.
        outcomes = await asyncio.gather(*(self.ctx.emit("scan", r) for r in results), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                self.log.error("scan could not be queued for head office: %s", outcome,
                               extra={"device": self.ctx.device_id})

    def _log_rejected(self, result: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._window_start >= 60:
            if self._suppressed:
                self.log.warning("%d more rejected scans in the last minute were not logged", self._suppressed,
                                 extra={"device": self.ctx.device_id})
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged >= self.log_per_minute:
            self._suppressed += 1
            return
        self._logged += 1
        self.log.warning("rejected scan: %s (%s; %d bytes)", result["reason"], result["detail"], result["length"],
                         extra={"device": self.ctx.device_id})
