"""`storelink demo` part: a fake ZPL label printer, a fake OpenEPaperLink access point with a few tags and a
fake receipt printer, configured as devices `labels-1`, `esl-ap` and `slips-1`. The story reads what the printer
printed and what each tag shows after it checks in (`peers()`), so a price change can be watched reaching the
shelf (SKUs with a tag are in DEMO_TAGS).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from storelink.drivers.sim.escpos_printer import FakeEscposPrinter
from storelink.drivers.sim.openepaperlink import FakeAccessPoint
from storelink.drivers.sim.zpl_printer import FakeZplPrinter

DEMO_TAGS = {"1001": "0000A0B1C2D3E401", "1002": "0000A0B1C2D3E402", "1003": "0000A0B1C2D3E403",
             "1004": "0000A0B1C2D3E404"}
CHECKIN_S = 3.0  # real tags check in about every 40 s; the demo's are quicker so the story moves on
_peers: dict[str, Any] = {}


def prepare(cfg: dict[str, Any], workdir: Path) -> None:
    # The fakes bind their ports now, so the device tables can point at them before the gateway starts.
    zpl = FakeZplPrinter()
    zpl.core.print_seconds = 0.5
    ap = FakeAccessPoint(list(DEMO_TAGS.values()), checkin_delay=CHECKIN_S)
    escpos = FakeEscposPrinter()
    _peers.update(zpl=zpl, ap=ap, escpos=escpos)
    cfg.setdefault("devices", []).extend([
        {"id": "labels-1", "driver": "zpl_printer", "host": "127.0.0.1", "port": zpl.port,
         "poll_interval": 5.0, "retry_interval": 1.0},
        {"id": "esl-ap", "driver": "openepaperlink", "url": ap.url, "tags": DEMO_TAGS, "poll_interval": 1.0},
        {"id": "slips-1", "driver": "escpos_printer", "host": "127.0.0.1", "port": escpos.port,
         "status_interval": 10.0},
    ])


def peers() -> tuple[FakeZplPrinter, FakeAccessPoint, FakeEscposPrinter]:
    return _peers["zpl"], _peers["ap"], _peers["escpos"]


async def run(_gateway: Any) -> None:
    zpl, ap, escpos = peers()
    await zpl.start()
    await ap.start()
    await escpos.start()
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await zpl.stop()
            await ap.close()
            await escpos.stop()

