"""Flash wear of each database through its own class: what one event, label, tag or kiosk session writes.

    sudo .venv/bin/python bench/wear_parts.py [--runs 3]

Each part runs in its own process (its /proc/self/io is its alone) on a loop-mounted ext4 (tests/loopfs.py), as the
gateway drives it, with ``synchronous=FULL``:

- outbox: 3,000 lone events, each put (one fsync'd commit) and then acknowledged as the uplink would after PUBACK;
- label queue (zpl_printer): a 2,000-label price change queued in one prepare, then printed 20 at a time (take,
  then mark printed, as the driver does after the printer's ``~HS``);
- ESL state (openepaperlink): 2,000 tags planned, pushed in uploads of 50, each tag's confirmation recorded;
- kiosk journal: 100 customer sessions, each started, given three persisted values, ended (secure delete, WAL
  truncated).

Printed: bytes written (write_bytes) and at the device, per unit. The same script runs against an older checkout
(its own venv's python) to compare. Medians of --runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.loopfs import LoopFs

KIB = 1024
COMMON = textwrap.dedent("""
    import asyncio, json, sys, time
    from pathlib import Path
    work, stat = Path(sys.argv[1]), sys.argv[2]
    def wb():
        return int(next(l for l in open("/proc/self/io") if l.startswith("write_bytes:")).split()[1])
    def dev():
        return int(open(stat).read().split()[6]) * 512
    def report(units, w0, d0):
        print(json.dumps({"written": (wb() - w0) / units, "device": (dev() - d0) / units}))
""")
PARTS = {
    "outbox, per lone event": ("event", """
        from storelink.config import StorageConfig
        from storelink.outbox import Outbox
        async def main():
            ob = Outbox(StorageConfig(path=work / "ob.db"))
            ob.open()
            data = {"till": "till-1", "total": 1497, "lines": [{"sku": "4006381333931", "qty": 1, "price": 499}]}
            for _ in range(1200):  # the WAL at its working size, past its first checkpoint
                ob.ack([(await ob.put("sale", "till-1", data)).seq])
            await asyncio.sleep(1.5)
            w0, d0 = wb(), dev()
            for _ in range(3000):
                ob.ack([(await ob.put("sale", "till-1", data)).seq])
            await asyncio.sleep(1.5)  # the last delete
            ob.close()
            report(3000, w0, d0)
        asyncio.run(main())
    """),
    "label queue, per label printed": ("label", """
        from storelink.drivers.label_queue import LabelQueue, NewLabel
        q = LabelQueue(work / "zpl.db", "FULL")
        def change(version):
            return [NewLabel(f"S{i:06d}", (f"^XA^CI28^FO40,30^A0N,42^FDItem number {i} 500 g^FS^FO40,90^A0N,90"
                                          f"^FD{version}.{i % 100:02d}^FS^BY2^FO40,200^BEN,80,Y,N^FD4000000{i:05d}"
                                          "^FS^XZ").encode() * 3) for i in range(2000)]
        def cycle(version):
            q.prepare(version, change(version))
            q.commit(version)
            while q.take(20):
                q.mark_sent_printed()
        cycle(1)
        w0, d0 = wb(), dev()
        cycle(2)
        report(2000, w0, d0)
    """),
    "ESL state, per tag confirmed": ("tag", """
        from storelink.drivers.esl_state import EslState
        s = EslState(work / "esl.db", "FULL")
        tags = [(f"00000C{i:010X}", f"S{i:06d}") for i in range(2000)]
        def cycle(version):
            s.set_version(version, "prepared")
            s.plan(version, tags)
            for k in range(0, len(tags), 50):
                part = tags[k:k + 50]
                s.record_pushes(version, [(m, sku, json.dumps([{"text": [0, 0, f"{version}.{sku}"]}] * 4),
                                           f"h{version - 1}", None) for m, sku in part])
                s.mark_uploaded(version, [m for m, _ in part])
            s.set_version(version, "committed")
            for m, _ in tags:
                s.confirm(version, m, f"h{version}")
        cycle(1)
        w0, d0 = wb(), dev()
        cycle(2)
        report(2000, w0, d0)
    """),
    "kiosk journal, per session": ("session", """
        from storelink.kiosk.sessions import KioskSessions
        async def emit(*_a):
            return None
        async def main():
            k = KioskSessions(work / "kiosk", emit)
            await k.open()
            async def session(i):
                await k.session_started("kiosk-1")
                for key in ("cart", "loyalty", "receipt"):
                    await k.persist("kiosk-1", key, {"n": i, "items": [{"sku": "4006381333931", "qty": 2}] * 5})
                await k.session_ended("kiosk-1")
            for i in range(20):
                await session(i)
            w0, d0 = wb(), dev()
            for i in range(100):
                await session(i)
            report(100, w0, d0)
            await k.close()
        asyncio.run(main())
    """),
}


def run_part(fs: LoopFs, code: str, tag: str) -> dict[str, float]:
    work = fs.mountpoint / tag
    work.mkdir()
    subprocess.run(["sync", "-f", str(fs.mountpoint)], check=True)
    done = subprocess.run([sys.executable, "-c", COMMON + textwrap.dedent(code), str(work), fs.stat_path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tag}: {done.stderr[-2000:]}")
    subprocess.run(["rm", "-rf", str(work)], check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in PARTS}
    with tempfile.TemporaryDirectory(prefix="bench-wear-parts-") as tmp, LoopFs(Path(tmp), 256) as fs:
        for r in range(args.runs):
            for i, (name, (_unit, code)) in enumerate(PARTS.items()):
                results[name].append(run_part(fs, code, f"{r}-{i}"))
            print(f"run {r + 1}/{args.runs} done", file=sys.stderr, flush=True)
    print(f"\nflash wear per unit of work, synchronous=FULL, median of {args.runs} ({sys.executable})")
    print(f"  {'part':34} {'written':>10} {'device':>10}")
    for name in PARTS:
        w = statistics.median(x["written"] for x in results[name]) / KIB
        d = statistics.median(x["device"] for x in results[name]) / KIB
        print(f"  {name:34} {w:7.1f} KiB {d:7.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
