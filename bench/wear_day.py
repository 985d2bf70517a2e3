"""A store's day for bench/wear.py: what a gateway writes to its SD card in 24 hours, and the card's life.

The day (docs/appliance.md, "Flash wear"): 4 tills ring up 3,000 sales between them (over the till protocol, one
sale at a time per till), a scanner sends 5,000 scans, 20 devices send telemetry every 10 s (172,800 events),
head office changes the price of all 2,000 items of the book once (4 tills and a ZPL label printer take part), the
broker connection drops and comes back 5 times (retained states republished), and the gateway idles the rest
of the time. Each part is measured on its own on a real `storelink run` whose data is on a loop-mounted ext4:
the events at ``scale`` of their daily count (one at a time, the costly case) then scaled up, the price change
and the reconnects in full, idling for a minute then scaled to 24 hours. The log (the systemd journal in the
appliance) is counted apart: its lines and bytes.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.wear_harness import STORE, Counters, Poster, WearGateway
from storelink.drivers.sim.till import make_sale
from storelink.hq.batch import build_batch
from storelink.remote.signing import keygen
from tests.helpers import Mosquitto, free_port, wait_for
from tests.loopfs import LoopFs
from tests.prices_helpers import Publisher
from tests.store_floor import StoreFloor

KIB, MIB = 1024, 1024 * 1024
DAY = {"sales": 3000, "scans": 5000, "telemetry": 20 * 24 * 360}
TILLS = ["1", "2", "3", "4"]
BOOK, CHANGED, RECONNECTS, IDLE_S = 2000, 2000, 5, 60.0
CARD_BYTES, CARD_CYCLES = 32 * 10**9, 3000


def _rows(version: int) -> list[dict[str, Any]]:
    return [{"sku": f"S{i:06d}", "gtin": f"{4000000000000 + i:013d}", "description": f"Item number {i} 500 g",
             "price": 100 + i % 900 + (10 if version == 2 and i < CHANGED else 0), "unit_price": 400 + i % 900,
             "unit_basis": "kg"} for i in range(BOOK)]


def _syncfs(fs: LoopFs) -> None:
    import subprocess

    subprocess.run(["sync", "-f", str(fs.mountpoint)], check=True)


class Day:
    def __init__(self, work: Path, fs: LoopFs, broker: Mosquitto):
        self.fs, self.broker = fs, broker
        self.key = keygen()
        self.floor = StoreFloor(TILLS, {}, free_port())
        devices = "".join(f'[[devices]]\nid = "till-{t}"\ndriver = "till_tcp"\nlisten = "127.0.0.1:'
                          f'{self.floor.till_port}"\ntill_id = "{t}"\nrequest_timeout = 30\n' for t in TILLS)
        devices += (f'[[devices]]\nid = "zpl"\ndriver = "zpl_printer"\nhost = "127.0.0.1"\n'
                    f"port = {self.floor.printer.port}\npoll_interval = 15\n")
        self.gw = WearGateway(work, fs, broker, f'[trust]\npublic_keys = ["{self.key.public_b64}"]\n'
                                                f"[prices]\nprepare_deadline = 300\n{devices}")
        self.hq = Publisher(broker.port)

    def start(self) -> None:
        """Setup, not counted: the whole book once to every till and the printer, and 1,100 events so the
        outbox's WAL has grown to its working size (once per start; see bench/wear.py)."""
        self.gw.start()
        self.floor.start_tills()
        wait_for(lambda: all(s.hello_reply for s in self.floor.tills.values()), 30, what="tills connected")
        self.price_change(1)
        poster = Poster(self.gw.http_port)
        for i in range(1100):
            poster.post({"kind": "telemetry", "device": "warm-up", "data": {"n": i}})
        poster.close()

    def measure(self, work: Any, expect_events: int) -> Counters:
        _syncfs(self.fs)
        before, delivered = self.gw.counters(), self.gw.delivered()
        work()
        self.gw.wait_drained(delivered + expect_events, 3.0)
        _syncfs(self.fs)
        return self.gw.counters() - before

    def events(self, scale: float) -> dict[str, tuple[int, Counters]]:
        out = {}
        rnd = random.Random(13)
        poster = Poster(self.gw.http_port)

        def sales(n: int) -> None:
            for i in range(n):
                till = TILLS[i % len(TILLS)]
                self.floor.call(self.floor.tills[till].sale(make_sale(till, 2)))

        def scans(n: int) -> None:
            for _ in range(n):
                code = f"{4000000000000 + rnd.randrange(BOOK):013d}"
                poster.post({"kind": "scan", "device": "scanner-1", "data": {"code": code, "symbology": "ean13"}})

        def telemetry(n: int) -> None:
            for i in range(n):
                data = {"cpu": round(rnd.random(), 2), "temp_c": 40 + rnd.randrange(20), "rssi": -60}
                poster.post({"kind": "telemetry", "device": f"dev-{i % 20}", "data": data})

        for kind, send in (("sales", sales), ("scans", scans), ("telemetry", telemetry)):
            n = max(1, round(DAY[kind] * scale))
            out[kind] = (n, self.measure(lambda s=send, n=n: s(n), n))
        poster.close()
        return out

    def price_change(self, version: int) -> None:
        self.hq.batch(build_batch(_rows(version), version=version, batch_id=f"day-{version}", store=STORE,
                                  key=self.key.private_b64), store=STORE)

        def committed() -> bool:
            for e in self.gw.subscriber.events(STORE):
                if e["kind"] in ("price.aborted", "price.rejected") and e["data"].get("version") == version:
                    raise RuntimeError(f"version {version}: {e}")
                if e["kind"] == "price.committed" and e["data"]["version"] == version:
                    return True
            return False

        def printed() -> int:
            return sum(e["data"]["labels"] for e in self.gw.subscriber.events(STORE) if e["kind"] == "label"
                       and e["data"].get("event") == "printed" and e["data"].get("versions") == [version])

        wait_for(committed, 600, 0.1, what=f"price version {version} committed")
        wait_for(lambda: set(self.floor.till_versions().values()) == {version}, 60, what="tills switched")
        wait_for(lambda: printed() >= (BOOK if version == 1 else CHANGED), 600, 0.2, what="every label printed")

    def reconnects(self) -> None:
        for _ in range(RECONNECTS):
            self.broker.stop()
            wait_for(lambda: not self.gw.status()["uplink"]["connected"], 15, what="the uplink to notice")
            self.broker.start()
            self.gw.proc.wait_online(30)

    def close(self) -> None:
        self.gw.stop()
        self.hq.close()
        self.floor.close()


def day_run(work: Path, scale: float) -> dict[str, float]:
    """Bytes per day by part: write_bytes (w), device bytes (d), log bytes (log) and log lines (lines)."""
    broker = Mosquitto(work).start()
    out: dict[str, float] = {}
    try:
        with LoopFs(work, 512) as fs:
            day = Day(work, fs, broker)
            try:
                day.start()
                for kind, (n, c) in day.events(scale).items():
                    f = DAY[kind] / n
                    out |= {f"{kind} w": c.write_bytes * f, f"{kind} d": c.device_bytes * f,
                            f"{kind} log": c.log_bytes * f}
                c = day.measure(lambda: day.price_change(2), 1)
                out |= {"price change w": c.write_bytes, "price change d": c.device_bytes,
                        "price change log": c.log_bytes}
                c = day.measure(day.reconnects, 0)
                out |= {"reconnects w": c.write_bytes, "reconnects d": c.device_bytes, "reconnects log": c.log_bytes}
                c = day.measure(lambda: time.sleep(IDLE_S), 0)
                f = 86400 / c.at
                out |= {"idle w": c.write_bytes * f, "idle d": c.device_bytes * f, "idle log": c.log_bytes * f}
                lines = day.gw.proc.log.read_text(errors="replace").count("\n")
                out["log lines"] = lines
            finally:
                day.close()
    finally:
        broker.stop()
    return out


PARTS = ["sales", "scans", "telemetry", "price change", "reconnects", "idle"]


def report_day(runs: list[dict[str, float]], scale: float) -> None:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\na store's day (events sent at {scale:g} of their daily count and scaled; median of {len(runs)})")
    print(f"  {'part':44} {'write_bytes':>12} {'device':>10} {'log':>9}")
    labels = {"sales": "3,000 sales from 4 tills", "scans": "5,000 scans", "telemetry":
              "172,800 telemetry events (20 devices / 10 s)", "price change": f"price change of {CHANGED:,} items, "
              "4 tills + labels", "reconnects": f"{RECONNECTS} broker reconnects (state republished)",
              "idle": "idle, scaled to 24 h"}
    for part in PARTS:
        print(f"  {labels[part]:44} {med[part + ' w'] / MIB:8.1f} MiB {med[part + ' d'] / MIB:6.1f} MiB "
              f"{med[part + ' log'] / KIB:5.0f} KiB")
    total_w = sum(med[p + " w"] for p in PARTS)
    total_d = sum(med[p + " d"] for p in PARTS)
    print(f"  {'total per day':44} {total_w / MIB:8.1f} MiB {total_d / MIB:6.1f} MiB")
    for name, total in (("write_bytes", total_w), ("device", total_d)):
        years = CARD_BYTES * CARD_CYCLES / total / 365
        print(f"  32 GB card x 3,000 cycles at this rate ({name}): {years:,.0f} years")
    print(f"  log lines in the whole run: {med['log lines']:.0f}")
