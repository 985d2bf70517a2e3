"""`storelink demo` part: a fake ZPL label printer, a fake OpenEPaperLink access point with a few tags and a
fake receipt printer, configured as devices `labels-1`, `esl-ap` and `slips-1`. What the printer prints and
what each tag shows after it checks in is printed to the console, so a price change can be watched rolling
across the shelf (the price part's demo publishes one; SKUs with a tag are in DEMO_TAGS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from storelink.drivers.sim.escpos_printer import FakeEscposPrinter
from storelink.drivers.sim.openepaperlink import FakeAccessPoint, FakeTag
from storelink.drivers.sim.zpl_printer import FakeZplPrinter

DEMO_TAGS = {"1001": "0000A0B1C2D3E401", "1002": "0000A0B1C2D3E402", "1003": "0000A0B1C2D3E403",
             "1004": "0000A0B1C2D3E404"}
_peers: dict[str, Any] = {}


def prepare(cfg: dict[str, Any], workdir: Path) -> None:
    # The fakes bind their ports now, so the device tables can point at them before the gateway starts.
    zpl = FakeZplPrinter()
    zpl.core.print_seconds = 0.5
    ap = FakeAccessPoint(list(DEMO_TAGS.values()), checkin_delay=4.0)  # real tags: about every 40 s
    escpos = FakeEscposPrinter()
    _peers.update(zpl=zpl, ap=ap, escpos=escpos)
    cfg.setdefault("devices", []).extend([
        {"id": "labels-1", "driver": "zpl_printer", "host": "127.0.0.1", "port": zpl.port,
         "poll_interval": 5.0, "retry_interval": 1.0},
        {"id": "esl-ap", "driver": "openepaperlink", "url": ap.url, "tags": DEMO_TAGS, "poll_interval": 1.0},
        {"id": "slips-1", "driver": "escpos_printer", "host": "127.0.0.1", "port": escpos.port,
         "status_interval": 10.0},
    ])


def _tag_line(tag: FakeTag) -> None:
    try:
        texts = [e["text"][2] for e in json.loads(tag.content or "[]") if "text" in e]
    except (ValueError, KeyError, TypeError):
        texts = ["(content the demo cannot read)"]
    print(f"[esl tag {tag.mac}] checked in, now shows: {' | '.join(texts)}", flush=True)


async def run(gateway: Any) -> None:
    zpl, ap, escpos = _peers["zpl"], _peers["ap"], _peers["escpos"]
    await zpl.start()
    await ap.start()
    await escpos.start()
    ap.on_checkin.append(_tag_line)
    print(f"[labels] fake ZPL printer on 127.0.0.1:{zpl.port}, fake ESL access point at {ap.url} "
          f"(tags for SKUs {', '.join(DEMO_TAGS)}), fake receipt printer on 127.0.0.1:{escpos.port}", flush=True)
    shown = 0
    try:
        while True:
            fields = zpl.core.printed_fields()
            for label in fields[shown:]:
                print(f"[zpl printer] printed shelf label: {' | '.join(label)}", flush=True)
            shown = len(fields)
            while escpos.jobs:
                print(f"[receipt printer] printed a slip ({len(escpos.jobs.pop(0))} bytes)", flush=True)
            await asyncio.sleep(0.5)
    finally:
        with contextlib.suppress(Exception):
            await zpl.stop()
            await ap.close()
            await escpos.stop()

