"""Where each KiB per event goes: the outbox's SQL, one change at a time, on a loop-mounted ext4.

    sudo .venv/bin/python bench/wear_breakdown.py [--events 3000] [--runs 3]

Each rung runs in its own process (so /proc/self/io is its alone) and does, per event, what the outbox does for
a lone event whose PUBACK comes back before the next one arrives: one fsync'd transaction inserting the row,
and the delete of the previous event as the rung says. The first rung is the outbox before issue 13 (a seq row
updated in every commit, an index on (critical, seq), the delete as its own fsync'd commit, 4 KiB pages, the
build's secure_delete=ON); each later rung removes one thing, the last is the outbox after it. A rung's cost is
write_bytes / events (4 KiB per page cache page dirtied) and the device's sectors (ext4 data, metadata, journal).
Checkpoints are in every rung (SQLite's default autocheckpoint of 1000 frames); the line "without checkpoints"
switches them off to show their share.
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
PAYLOAD = 330  # bytes of a sale event's JSON (bench/wear.py's SALE)

RUNG = textwrap.dedent("""
    import json, os, sqlite3, sys
    spec, path, n, stat = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    def wb():
        return int(next(l for l in open("/proc/self/io") if l.startswith("write_bytes:")).split()[1])
    def dev():
        return int(open(stat).read().split()[6]) * 512
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA page_size={spec['page_size']}")
    assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA secure_delete={spec['secure_delete']}")
    db.execute(f"PRAGMA wal_autocheckpoint={spec['autocheckpoint']}")
    db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, kind TEXT NOT NULL, "
               "critical INTEGER NOT NULL, ts REAL NOT NULL, payload BLOB NOT NULL)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER)")
    if spec["index"]:
        db.execute("CREATE INDEX outbox_by_class ON outbox(critical, seq)")
    payload = b"x" * int(spec["payload"])
    def event(seq):
        db.execute("BEGIN IMMEDIATE")
        if spec["delete"] == "folded" and seq > 1:
            db.execute("DELETE FROM outbox WHERE seq=?", (seq - 1,))
        db.execute("INSERT INTO outbox VALUES (?, ?, 'sale', 1, 0.0, ?)", (seq, os.urandom(16).hex(), payload))
        if spec["meta"]:
            db.execute("INSERT INTO meta VALUES ('next_seq', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (seq + 1,))
        db.execute("COMMIT")
        if spec["delete"] in ("separate", "separate-nosync"):
            if spec["delete"] == "separate-nosync":
                db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            db.execute("SELECT count(*), sum(length(payload)), sum(critical) FROM outbox WHERE seq=?", (seq,))
            db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
            db.execute("COMMIT")
            db.execute("PRAGMA synchronous=FULL")
    warm = 1500  # the WAL at its working size and past its first checkpoint, as in a running gateway
    for seq in range(1, warm + 1):
        event(seq)
    w0, d0 = wb(), dev()
    for seq in range(warm + 1, warm + n + 1):
        event(seq)
    print(json.dumps({"written": (wb() - w0) / n, "device": (dev() - d0) / n}))
""")

BEFORE = {"meta": True, "index": True, "delete": "separate", "page_size": 4096, "secure_delete": "ON",
          "autocheckpoint": 1000, "payload": PAYLOAD}
LADDER: list[tuple[str, dict[str, object]]] = [
    ("before: seq row + index + fsync'd delete commit, 4 KiB", {}),
    ("delete commit not fsync'd", {"delete": "separate-nosync"}),
    ("delete folded into the next insert commit", {"delete": "folded"}),
    ("no seq row (high-water mark kept by the rows)", {"delete": "folded", "meta": False}),
    ("no (critical, seq) index", {"delete": "folded", "meta": False, "index": False}),
    ("secure_delete=FAST", {"delete": "folded", "meta": False, "index": False, "secure_delete": "FAST"}),
    ("2 KiB pages", {"delete": "folded", "meta": False, "index": False, "secure_delete": "FAST",
                     "page_size": 2048}),
    ("1 KiB pages (after)", {"delete": "folded", "meta": False, "index": False, "secure_delete": "FAST",
                             "page_size": 1024}),
    ("  (after, without checkpoints)", {"delete": "folded", "meta": False, "index": False,
                                        "secure_delete": "FAST", "page_size": 1024, "autocheckpoint": 0}),
]


def run_rung(fs: LoopFs, spec: dict[str, object], n: int, tag: str) -> dict[str, float]:
    path = fs.mountpoint / f"rung-{tag}.db"
    subprocess.run(["sync", "-f", str(fs.mountpoint)], check=True)
    out = subprocess.run([sys.executable, "-c", RUNG, json.dumps(spec), str(path), str(n), fs.stat_path],
                         capture_output=True, text=True, check=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return dict(json.loads(out.stdout))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in LADDER}
    with tempfile.TemporaryDirectory(prefix="bench-wear-breakdown-") as tmp, LoopFs(Path(tmp), 128) as fs:
        for r in range(args.runs):
            for i, (name, change) in enumerate(LADDER):
                results[name].append(run_rung(fs, {**BEFORE, **change}, args.events, f"{r}-{i}"))
            print(f"run {r + 1}/{args.runs} done", file=sys.stderr, flush=True)
    print(f"\nper event: one fsync'd insert commit, {PAYLOAD}-byte payload, {args.events} events, "
          f"median of {args.runs}")
    print(f"  {'rung':52} {'written':>9} {'change':>8} {'device':>9}")
    prev = None
    for name, _ in LADDER:
        w = statistics.median(x["written"] for x in results[name]) / KIB
        d = statistics.median(x["device"] for x in results[name]) / KIB
        delta = "" if prev is None or name.startswith("  ") else f"{w - prev:+8.2f}"
        print(f"  {name:52} {w:6.2f} KiB {delta:>8} {d:6.2f} KiB")
        if not name.startswith("  "):
            prev = w
    return 0


if __name__ == "__main__":
    sys.exit(main())
