"""ZPL II for shelf labels, and the printer's `~HS` host status answer.

Rendering is a pure function of (item, currency, version, layout) so the same label comes out byte for byte
after a restart, which is what lets the queue re-send a job without changing what the shelf shows.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from biip import ParseError
from biip.gtin import Gtin, GtinFormat
from pydantic import Field

from storelink.drivers.base import PriceItem
from storelink.drivers.price_text import format_money, unit_price_text
from storelink.validation import StrictModel

log = logging.getLogger(__name__)

STX, ETX = b"\x02", b"\x03"
HOST_STATUS_QUERY = b"~HS\r\n"


class LabelLayout(StrictModel):
    """Label geometry. Sizes in millimetres so a layout survives a change of printer resolution."""

    dpi: int = Field(203, description="printer resolution: 152, 203, 300 or 600 dots per inch")
    width_mm: float = Field(58.0, gt=10, le=220)
    height_mm: float = Field(38.0, gt=10, le=300)
    margin_mm: float = Field(2.0, ge=0, le=20)
    barcode: bool = Field(True, description="print the item's GTIN as EAN-13/UPC-A/EAN-8")

    def dots(self, mm: float) -> int:
        return round(mm * self.dpi / 25.4)


def _field_text(text: str) -> str:
    """Text for a ^FD field under ^FH_: ZPL control characters and `_` itself are hex-escaped, so a product name
    containing ^ or ~ can never end the field early or inject a command; control characters are dropped."""
    out = []
    for ch in text:
        if ch in "^~_\\":
            out.append(f"_{ord(ch):02X}")
        elif ch.isprintable():
            out.append(ch)
    return "".join(out)


def barcode_command(gtin: str | None, module_dots: int, height_dots: int) -> tuple[str, str | None]:
    """(ZPL barcode field, problem). The check digit is left to the printer: ^BE takes 12 digits, ^BU 11, ^B8 7.
    A GTIN that fails its check digit is not printed (a shelf barcode that scans to the wrong item is worse
    than none) and the reason is returned for the job record."""
    if not gtin:
        return "", None
    try:
        parsed = Gtin.parse(gtin.strip())
    except ParseError as err:
        return "", f"barcode left off: {err}"
    by = f"^BY{module_dots}"
    if parsed.format == GtinFormat.GTIN_12:
        return f"{by}^BUN,{height_dots},Y,N,Y^FD{parsed.as_gtin_12()[:11]}^FS", None
    if parsed.format == GtinFormat.GTIN_8:
        return f"{by}^B8N,{height_dots},Y,N^FD{parsed.as_gtin_8()[:7]}^FS", None
    if parsed.format == GtinFormat.GTIN_14:
        return "", f"barcode left off: GTIN-14 {parsed.value} (packaging level) has no EAN-13 form"
    return f"{by}^BEN,{height_dots},Y,N^FD{parsed.as_gtin_13()[:12]}^FS", None


def render_label(item: PriceItem, currency: str, version: int, layout: LabelLayout,
                 valid_from: str | None = None) -> tuple[bytes, list[str]]:
    """One shelf label as a complete ^XA...^XZ format (UTF-8, ^CI28), and any problems met rendering it.
    `valid_from` (a label printed ahead of a scheduled change) is printed on it, so the shelf is changed then."""
    problems: list[str] = []
    w, h, m = layout.dots(layout.width_mm), layout.dots(layout.height_mm), layout.dots(layout.margin_mm)
    inner = w - 2 * m
    name_h = max(16, h // 9)
    price_h = max(30, h // 3)
    small_h = max(14, h // 12)
    tiny_h = max(12, h // 16)
    lines = [
        "^XA", "^CI28", f"^PW{w}", f"^LL{h}", "^LH0,0",
        # product name: a field block of up to two lines so a long name wraps instead of running off the label
        f"^FO{m},{m}^A0N,{name_h},{name_h}^FB{inner},2,0,L,0^FH_^FD{_field_text(item.description)}^FS",
        f"^FO{m},{m + 2 * name_h + 4}^A0N,{price_h},{price_h}^FH_^FD"
        f"{_field_text(format_money(item.price, currency))}^FS",
    ]
    unit = unit_price_text(item, currency)
    y_unit = m + 2 * name_h + price_h + 8
    if unit:
        lines.append(f"^FO{m},{y_unit}^A0N,{small_h},{small_h}^FH_^FD{_field_text(unit)}^FS")
    if layout.barcode:
        bar_h = max(20, h - y_unit - small_h - m - 2 * tiny_h)
        module = max(1, layout.dpi // 150)
        code, problem = barcode_command(item.gtin, module, bar_h)
        if problem:
            problems.append(f"sku {item.sku}: {problem}")
        if code:
            # right half of the label, under the price, so a long name never overlaps the bars
            lines.append(f"^FO{m + inner // 2},{y_unit + small_h + 4}{code}")
    if valid_from:
        lines.append(f"^FO{m + inner // 2},{m + 2 * name_h + 4}^A0N,{tiny_h},{tiny_h}^FH_^FD"
                     f"{_field_text('valid from ' + valid_from)}^FS")
    # price version and SKU printed small: a store clerk can tell at a glance which price list a label is from
    lines.append(
        f"^FO{m},{h - m - tiny_h}^A0N,{tiny_h},{tiny_h}^FH_^FD{_field_text(item.sku)}  v{version}^FS"
    )
    lines += ["^PQ1", "^XZ"]
    return ("\n".join(lines) + "\n").encode("utf-8"), problems


@dataclasses.dataclass(frozen=True)
class HostStatus:
    """The parts of the three `~HS` strings that decide whether a label can print and whether it has."""

    paper_out: bool
    paused: bool
    buffer_full: bool
    formats_in_buffer: int
    partial_format: bool
    corrupt_ram: bool
    under_temperature: bool
    over_temperature: bool
    head_open: bool
    ribbon_out: bool
    labels_remaining: int

    def problems(self) -> list[str]:
        names = [
            ("paper_out", "paper out"), ("head_open", "head open"), ("ribbon_out", "ribbon out"),
            ("paused", "paused"), ("buffer_full", "receive buffer full"), ("corrupt_ram", "corrupt RAM"),
            ("under_temperature", "head too cold"), ("over_temperature", "head too hot"),
        ]
        return [text for attr, text in names if getattr(self, attr)]

    @property
    def healthy(self) -> bool:
        return not self.problems()

    @property
    def idle(self) -> bool:
        """Nothing left to print: no formats waiting in the buffer, no labels left in the batch."""
        return self.formats_in_buffer == 0 and self.labels_remaining == 0 and not self.partial_format


class HostStatusError(ValueError):
    """An answer to ~HS that is not three well-formed STX...ETX strings."""


_FRAME = re.compile(rb"\x02([^\x02\x03]*)\x03")


def complete_frames(data: bytes) -> int:
    return len(_FRAME.findall(data))


def parse_host_status(data: bytes) -> HostStatus:
    frames = [f.decode("ascii", "replace").split(",") for f in _FRAME.findall(data)]
    if len(frames) < 3:
        raise HostStatusError(f"~HS answer has {len(frames)} of 3 status strings: {data[:80]!r}")
    s1, s2 = frames[0], frames[1]
    if len(s1) < 12 or len(s2) < 10:
        raise HostStatusError(f"~HS strings too short ({len(s1)} and {len(s2)} fields): {data[:80]!r}")

    def flag(fields: list[str], i: int) -> bool:
        return fields[i].strip() == "1"

    def number(fields: list[str], i: int) -> int:
        try:
            return int(fields[i].strip())
        except ValueError as err:
            raise HostStatusError(f"~HS field {i} is not a number: {fields[i]!r}") from err

    return HostStatus(
        paper_out=flag(s1, 1), paused=flag(s1, 2), formats_in_buffer=number(s1, 4), buffer_full=flag(s1, 5),
        partial_format=flag(s1, 7), corrupt_ram=flag(s1, 9), under_temperature=flag(s1, 10),
        over_temperature=flag(s1, 11), head_open=flag(s2, 2), ribbon_out=flag(s2, 3),
        labels_remaining=number(s2, 8),
    )


def host_status_answer(status: HostStatus, label_length: int = 304) -> bytes:
    """The three strings a printer sends for `status` (used by the fake printer; fields we do not model are
    the factory defaults of a ZD420)."""
    def b(flag: bool) -> str:
        return "1" if flag else "0"

    s1 = (f"030,{b(status.paper_out)},{b(status.paused)},{label_length:04d},{status.formats_in_buffer:03d},"
          f"{b(status.buffer_full)},0,{b(status.partial_format)},000,{b(status.corrupt_ram)},"
          f"{b(status.under_temperature)},{b(status.over_temperature)}")
    s2 = f"001,0,{b(status.head_open)},{b(status.ribbon_out)},0,2,6,0,{status.labels_remaining:08d},1,000"
    s3 = "1234,0"
    return b"".join(STX + s.encode() + ETX + b"\r\n" for s in (s1, s2, s3))
