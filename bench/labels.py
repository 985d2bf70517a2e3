"""Label drivers benchmark: how long the label side of a 5,000-item price change takes to prepare.

    .venv/bin/python bench/labels.py [--items 5000] [--runs 3]

- zpl_printer: render + durably queue N labels (price_prepare), beside SQLite alone inserting the same label
  bytes in one transaction (ratio = driver / SQLite).
- openepaperlink: push N tags through a fake access point on loopback (price_prepare: one paged sweep of the
  AP's tag database for the hashes, the AP's current content of tags this gateway never wrote, the uploads),
  first for tags the gateway never wrote, then for the next version; beside bare aiohttp POSTs of the same content
  to the same fake AP with the same parallelism (ratio = next version / bare HTTP); and the time until all N tags
  confirmed once they have checked in.
Every figure is the median of --runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storelink.drivers.openepaperlink import OpenEPaperLink, OpenEPaperLinkConfig, render_tag_content
from storelink.drivers.sim.openepaperlink import FakeAccessPoint
from storelink.drivers.zpl_label import LabelLayout, render_label
from storelink.drivers.zpl_printer import ZplPrinter, ZplPrinterConfig
from tests.label_harness import Change, Item, RecordingContext


def items(n: int) -> list[Item]:
    return [Item(str(100000 + i), "4006381333931", 100 + i, f"Product number {i} 500 g", 200 + i, "kg")
            for i in range(n)]


async def zpl_run(work: Path, n: int) -> tuple[float, float]:
    cfg = ZplPrinterConfig.model_validate({"id": "bench", "driver": "zpl_printer", "host": "127.0.0.1"})
    driver = ZplPrinter(cfg, RecordingContext(work, "bench", synchronous="FULL"))
    change = Change(1, items(n))
    t0 = time.perf_counter()
    await driver.price_prepare(change)
    t_driver = time.perf_counter() - t0
    rows = [(i.sku, render_label(i, "EUR", 1, LabelLayout())[0]) for i in change.changed]
    db = sqlite3.connect(work / "baseline.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (sku TEXT, payload BLOB)")
    t0 = time.perf_counter()
    db.execute("BEGIN")
    db.executemany("INSERT INTO t VALUES (?, ?)", rows)
    db.execute("COMMIT")
    t_sqlite = time.perf_counter() - t0
    db.close()
    return t_driver, t_sqlite


async def esl_run(work: Path, n: int, parallel: int) -> tuple[float, float, float, float]:
    macs = {str(100000 + i): f"0000AA{i:010X}" for i in range(n)}
    ap = await FakeAccessPoint(list(macs.values()), checkin_delay=0.5).start()
    try:
        cfg = OpenEPaperLinkConfig.model_validate({"id": "bench", "driver": "openepaperlink", "url": ap.url,
                                                   "tags": macs, "max_parallel": parallel})
        driver = OpenEPaperLink(cfg, RecordingContext(work, "bench", synchronous="FULL"))
        change = Change(1, items(n))
        t0 = time.perf_counter()
        await driver.price_prepare(change)
        t_driver = time.perf_counter() - t0
        t0 = time.perf_counter()
        while not await driver.price_confirmed(1):
            await asyncio.sleep(0.1)
        t_confirm = time.perf_counter() - t0
        # steady state: every tag already shows content this gateway wrote (no /current read per tag)
        t0 = time.perf_counter()
        await driver.price_prepare(Change(2, [dataclasses.replace(i, price=i.price + 10) for i in change.changed]))
        t_steady = time.perf_counter() - t0
        await driver.ap.close()
        contents = [(macs[i.sku], render_tag_content(i, "EUR", 2, cfg.layout)) for i in change.changed]
        limit = asyncio.Semaphore(parallel)
        async with aiohttp.ClientSession() as http:
            async def post(mac: str, content: str) -> None:
                async with limit, http.post(f"{ap.url}/jsonupload", data={"mac": mac, "json": content}) as r:
                    await r.read()
            t0 = time.perf_counter()
            await asyncio.gather(*(post(m, c) for m, c in contents))
            t_bare = time.perf_counter() - t0
    finally:
        await ap.close()
    return t_driver, t_bare, t_confirm, t_steady


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=4)
    args = ap.parse_args()
    zpl, esl = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            zpl.append(await zpl_run(Path(tmp), args.items))
        with tempfile.TemporaryDirectory() as tmp:
            esl.append(await esl_run(Path(tmp), args.items, args.parallel))
    med = statistics.median
    zd, zs = med(r[0] for r in zpl), med(r[1] for r in zpl)
    ed, eb, ec, es = (med(r[k] for r in esl) for k in range(4))
    print(f"zpl_printer prepare {args.items} labels: {zd * 1000:.0f} ms (render + durable queue); "
          f"SQLite alone inserting the same rows: {zs * 1000:.0f} ms; ratio {zd / zs:.1f}x")
    print(f"openepaperlink prepare {args.items} tags (max_parallel {args.parallel}), first push to each tag: "
          f"{ed * 1000:.0f} ms; next version: {es * 1000:.0f} ms; bare aiohttp uploads of the same content: "
          f"{eb * 1000:.0f} ms; ratio (next version / bare) {es / eb:.1f}x")
    print(f"openepaperlink all {args.items} tags confirmed {ec * 1000:.0f} ms after prepare returned "
          f"(fake tags check in 0.5 s after their upload)")


if __name__ == "__main__":
    asyncio.run(main())
