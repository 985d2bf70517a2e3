"""Flash wear: bytes written to the block device per event, and a store's day in total.

    sudo .venv/bin/python bench/wear.py [--runs 3] [--day-scale 0.1] [--skip-day]

A real `storelink run` with a real Mosquitto; the gateway's data directory is an ext4 on a loop device (root:
losetup, mount), so next to the process's own /proc/PID/io ``write_bytes`` the device's sector counter shows what
an SD card would be asked to write, ext4's metadata and journal included. Events go one at a time through the
ingest API (HTTP keep-alive, each POST waits for its 202) and are drained to the broker and deleted; a figure is
(counter after everything was delivered and the outbox emptied) - (before), divided by the events.

- single events at 20/s and at 100/s, and bursts (100 events from 20 concurrent posters, one burst a second);
- the baseline, in the same run and on the same filesystem: bare SQLite with its defaults, WAL + FULL, one INSERT
  per transaction (no delete, no index, no seq row: only the floor of an fsync'd SQLite commit);
- the ratio gateway / baseline;
- a store's day (bench/wear_day.py): 4 tills with 3,000 sales over the till protocol, a scanner's 5,000 scans,
  telemetry every 10 s from 20 devices, one 2,000-item price change to the tills and a label printer, and the
  gateway idling; scaled by --day-scale and extrapolated to the whole day; total bytes and the SD-card lifetime
  it implies for a 32 GB card rated 3,000 write cycles. Every figure is the median of --runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.wear_harness import Counters, Poster, WearGateway, bare_sqlite
from tests.helpers import Mosquitto
from tests.loopfs import LoopFs

KIB = 1024
SALE = {"till": "till-1", "receipt": "T1-000123", "total": 1497, "currency": "EUR",
        "lines": [{"sku": "4006381333931", "qty": 1, "price": 499}, {"sku": "4006381333948", "qty": 2, "price": 499}],
        "payments": [{"tender": "card", "amount": 1497}]}
SETTLE = 3.0  # seconds after the outbox emptied: lazy deletes and their commit land in the interval


def syncfs(fs: LoopFs) -> None:
    """Write back what the filesystem holds dirty (only this one), so the device counter includes it."""
    subprocess.run(["sync", "-f", str(fs.mountpoint)], check=True)


def measure(gw: WearGateway, fs: LoopFs, send: Any, events: int) -> Counters:
    syncfs(fs)
    before, start_total = gw.counters(), gw.delivered()
    send()
    gw.wait_drained(start_total + events, SETTLE)
    syncfs(fs)
    return gw.counters() - before


def singles(gw: WearGateway, rate: float, events: int) -> None:
    poster = Poster(gw.http_port)
    t = time.monotonic()
    for i in range(events):
        t += 1 / rate
        time.sleep(max(0.0, t - time.monotonic()))
        poster.post({"kind": "sale", "device": "till-1", "data": {**SALE, "n": i}})
    poster.close()


def bursts(gw: WearGateway, count: int, size: int, posters: int = 20) -> None:
    local = threading.local()

    def post(i: int) -> None:
        if not hasattr(local, "p"):
            local.p = Poster(gw.http_port)
        local.p.post({"kind": "sale", "device": "till-1", "data": {**SALE, "n": i}})

    with ThreadPoolExecutor(posters) as pool:
        for b in range(count):
            t0 = time.monotonic()
            list(pool.map(post, range(b * size, (b + 1) * size)))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))


SCENARIOS: list[tuple[str, int, Any]] = [
    ("single events, 20/s", 1200, lambda gw: singles(gw, 20, 1200)),
    ("single events, 100/s", 3000, lambda gw: singles(gw, 100, 3000)),
    ("bursts of 100, 1/s", 3000, lambda gw: bursts(gw, 30, 100)),
]


def event_run(work: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    broker = Mosquitto(work).start()
    try:
        with LoopFs(work, 256) as fs:
            size = len(f'{{"id":"{"0" * 32}","seq":1000,"ts":"2026-01-01T00:00:00.000Z","kind":"sale",'
                       f'"device":"till-1","data":{SALE}}}')
            out["bare"], out["bare_dev"] = bare_sqlite(fs, 3000, size)
            gw = WearGateway(work, fs, broker).start()
            try:
                # Warm-up: the WAL grows to its working size once per start (1000 pages, then reused from the
                # start after each checkpoint), and a file that grows costs ext4 journal writes on every fsync.
                singles(gw, 200, 1100)
                gw.wait_drained(1100, SETTLE)
                for name, n, send in SCENARIOS:
                    c = measure(gw, fs, lambda s=send: s(gw), n)
                    out[name], out[name + " dev"], out[name + " log"] = (c.write_bytes / n, c.device_bytes / n,
                                                                          c.log_bytes / n)
                    print(f"  {name}: {c.write_bytes / n / KIB:.2f} KiB/event written, "
                          f"{c.device_bytes / n / KIB:.2f} KiB/event at the device, log {c.log_bytes / n:.0f} B",
                          file=sys.stderr, flush=True)
            finally:
                gw.stop()
    finally:
        broker.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--day-scale", type=float, default=0.1, help="fraction of a day's events actually sent")
    ap.add_argument("--skip-day", action="store_true")
    args = ap.parse_args()
    runs: list[dict[str, float]] = []
    day_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-wear-") as tmp:
        for r in range(args.runs):
            work = Path(tmp) / f"run{r}"
            work.mkdir()
            print(f"run {r + 1}/{args.runs}", file=sys.stderr, flush=True)
            runs.append(event_run(work))
            if not args.skip_day:
                from bench.wear_day import day_run

                (work / "day").mkdir()
                day_runs.append(day_run(work / "day", args.day_scale))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nflash wear per event (median of {args.runs}; KiB = 1024 bytes)")
    print(f"  {'':34} {'write_bytes':>12} {'device':>9} {'log':>8} {'/ baseline':>11}")
    print(f"  {'bare SQLite WAL+FULL, 1 INSERT/txn':34} {med['bare'] / KIB:9.2f} KiB {med['bare_dev'] / KIB:5.2f} KiB"
          f" {'':>8} {1:11.2f}")
    for name, _n, _s in SCENARIOS:
        print(f"  {'gateway, ' + name:34} {med[name] / KIB:9.2f} KiB {med[name + ' dev'] / KIB:5.2f} KiB "
              f"{med[name + ' log']:5.0f} B {med[name] / med['bare']:11.2f}")
    print("  (target: <= 8 KiB written per event at 20/s single events)")
    print("  all runs:", [{k: round(v / KIB, 2) for k, v in r.items()} for r in runs])
    if day_runs:
        from bench.wear_day import report_day

        report_day(day_runs, args.day_scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
