"""Price change benchmark: a 100,000-item batch, 10 simulated tills, 5,000 changed labels.

    .venv/bin/python bench/prices.py [--items 100000] [--tills 10] [--changed 5000] [--labels zpl|esl|both] [--runs 3]

A real `storelink run` with its own Mosquitto; 10 till simulators over TCP (drivers/sim/till.py), a fake ZPL
printer and/or a fake ESL access point with one tag per changed SKU. Each run first installs version 1 (the whole
book), then publishes version 2 (same 100k items, `--changed` prices different) and reads from the gateway's
`price.committed` event (its own clock, from the journal):

- last chunk received -> every chunk verified and staged, -> price book switched, -> every target committed;
- peak RSS of the gateway process (VmHWM) after the run;

printed beside the time SQLite alone takes to insert the same 100k rows in one transaction (same schema,
same pragmas), as a ratio. Every figure is the median of --runs. Targets: <= 5 s, <= 150 MB.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storelink.hq.batch import build_batch
from storelink.prices.db import SCHEMA
from storelink.remote.signing import keygen
from tests.helpers import GatewayProcess, Mosquitto, Subscriber, free_port, wait_for, write_config
from tests.prices_helpers import Publisher
from tests.store_floor import StoreFloor

STORE = "bench-store"


def rows(n: int, changed: int, version: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        price = 100 + i % 5000
        if version == 2 and i < changed:
            price += 10 if i % 2 else -10  # half up, half down
        out.append({"sku": f"S{i:07d}", "gtin": f"{4000000000000 + i:013d}", "price": price,
                    "unit_price": price * 4, "unit_basis": "kg", "description": f"Bench item number {i}"})
    return out


def sqlite_baseline(data: list[dict[str, Any]], workdir: Path) -> float:
    path = workdir / f"baseline-{time.monotonic_ns()}.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO staged(batch_id, sku, gtin, price, unit_price, unit_basis, description, promotion) "
                     "VALUES('b', ?, ?, ?, ?, ?, ?, NULL)",
                     [(r["sku"], r["gtin"], r["price"], r["unit_price"], r["unit_basis"], r["description"])
                      for r in data])
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_run(args: argparse.Namespace, workdir: Path, broker: Mosquitto) -> dict[str, float]:
    key = keygen()
    tags = {f"S{i:07d}": f"00000C{i:010X}" for i in range(args.changed)} if args.labels in ("esl", "both") else {}
    floor = StoreFloor([str(i + 1) for i in range(args.tills)], tags, free_port(), checkin_delay=0.5)
    devices = ""
    for t in floor.till_ids:
        devices += (f'[[devices]]\nid = "till-{t}"\ndriver = "till_tcp"\nlisten = "127.0.0.1:{floor.till_port}"\n'
                    f'till_id = "{t}"\nrequest_timeout = 30\n')
    if args.labels in ("zpl", "both"):
        devices += (f'[[devices]]\nid = "zpl"\ndriver = "zpl_printer"\nhost = "127.0.0.1"\n'
                    f"port = {floor.printer.port}\npoll_interval = 5\n")
    if tags:
        (workdir / "tags.csv").write_text("".join(f"{s},{m}\n" for s, m in tags.items()))
        devices += (f'[[devices]]\nid = "esl"\ndriver = "openepaperlink"\nurl = "{floor.ap.url}"\n'
                    f'tags_file = "{workdir / "tags.csv"}"\npoll_interval = 2\n')
    http = free_port()
    cfg = write_config(workdir / "storelink.toml", STORE, broker.port, http,
                       f'[trust]\npublic_keys = ["{key.public_b64}"]\n[prices]\nprepare_deadline = 300\n'
                       f"confirm_poll = 2\n{devices}")
    sub = Subscriber(broker.port, f"storelink/{STORE}/events/#")
    hq = Publisher(broker.port)
    gw = GatewayProcess(cfg, http).start()
    try:
        floor.start_tills()
        wait_for(lambda: all(s.hello_reply for s in floor.tills.values()), 30, what="tills connected")
        result: dict[str, float] = {}
        for version in (1, 2):
            if version == 2:
                assert gw.proc is not None
                result["setup_rss_mb"] = peak_rss_mb(gw.proc.pid)
                # reset the peak: what is measured is the change, not the initial load of the whole book
                Path(f"/proc/{gw.proc.pid}/clear_refs").write_text("5")
                result["rss_before_mb"] = peak_rss_mb(gw.proc.pid)
            b = build_batch(rows(args.items, args.changed, version), version=version, batch_id=f"bench-{version}",
                            store=STORE, key=key.private_b64)
            hq.batch(b, store=STORE)

            def committed(v: int = version) -> dict[str, Any] | None:
                for e in sub.events(STORE):
                    if e["kind"] == "price.committed" and e["data"]["version"] == v:
                        return dict(e["data"])
                    if e["kind"] in ("price.aborted", "price.rejected") and e["data"].get("version") == v:
                        raise RuntimeError(f"version {v}: {e}")
                return None

            data = wait_for(committed, 600, 0.05, what=f"version {version} committed")
            wait_for(lambda v=version: set(floor.till_versions().values()) == {v}, 120, what="tills switched")
        t = data["timings"]
        result |= {"to_staged": t["last_chunk_to_staged_s"], "to_book": t["last_chunk_to_book_s"],
                  "to_committed": t["last_chunk_to_committed_s"], "changed": data["changed"]}
        assert gw.proc is not None
        result["rss_mb"] = peak_rss_mb(gw.proc.pid)
        return result
    finally:
        gw.stop()
        hq.close()
        sub.close()
        floor.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--tills", type=int, default=10)
    p.add_argument("--changed", type=int, default=5_000)
    p.add_argument("--labels", choices=["zpl", "esl", "both"], default="zpl")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    runs: list[dict[str, float]] = []
    baselines: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-prices-") as tmp:
        for i in range(args.runs):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            broker = Mosquitto(work).start()
            try:
                runs.append(one_run(args, work, broker))
            finally:
                broker.stop()
            baselines.append(sqlite_baseline(rows(args.items, args.changed, 2), work))
            print(f"run {i + 1}: {json.dumps(runs[-1])}; sqlite alone {baselines[-1]:.3f} s", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    base = statistics.median(baselines)
    print(f"\nprices: {args.items:,} items, {args.tills} tills, {int(med['changed']):,} changed, labels: {args.labels}"
          f" (median of {args.runs})")
    print(f"  last chunk -> staged              {med['to_staged']:7.3f} s")
    print(f"  last chunk -> price book switched {med['to_book']:7.3f} s")
    print(f"  last chunk -> every target committed {med['to_committed']:7.3f} s   (target <= 5 s)")
    print(f"  peak RSS of the gateway           {med['rss_mb']:7.1f} MB  (target <= 150 MB)")
    print(f"  (peak RSS while loading version 1, the whole book to every device: {med['setup_rss_mb']:.1f} MB;"
          f" RSS when the change began: {med['rss_before_mb']:.1f} MB)")
    print(f"  SQLite alone, 100k rows, one txn  {base:7.3f} s")
    print(f"  ratio committed / SQLite alone    {med['to_committed'] / base:7.1f} x")
    return 0


if __name__ == "__main__":
    threading.excepthook = lambda a: None  # the floor's daemon thread may outlive a failed run quietly
    sys.exit(main())
