"""`storelink hq ingest` and `hq serve` run on head office's hq.toml like every `storelink hq` command: the broker,
head office's TLS identity and the database come from the file (flags override it), the ingest connects through
the one connection of all hq commands (storelink.hq.connect), and what it cannot use is one line and exit 69.

Real parts: a Mosquitto configured by `storelink hq broker-config` (TLS with client certificates, the ACL from the
enrolment records), an enrolled store's certificate publishing, the ingest and dashboard as processes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from storelink.drivers.sim.fleet import SimStore
from storelink.hq.db import open_database
from tests.fleet import Fleet
from tests.helpers import free_port, wait_for
from tests.ingest_helpers import IngestProcess, ServeProcess, one


def failed(done: subprocess.CompletedProcess[str], code: int, *expect: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for text in expect:
        assert text in lines[0], lines[0]


def test_ingest_and_serve_take_broker_tls_and_database_from_hq_toml(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "hq", {"store-a": ["north"]}).set_up()
    with fleet.config.open("a") as f:
        f.write('[database]\nurl = "sqlite:///head-office.db"\n')  # relative to hq.toml, not to the working dir
    env = {"STORELINK_HQ_CONFIG": str(fleet.config)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    broker = fleet.broker()
    ingest = IngestProcess(elsewhere, None, None, "w1", env=env)  # no --broker, no --database: hq.toml's
    serve = None
    bundle = fleet.bundle("store-a")
    store = fleet.client(bundle / "client.pem", bundle / "client.key")  # the enrolled store's own identity
    try:
        ingest.start()
        sim = SimStore("store-a")
        for i in range(20):
            assert store.publish(*sim.event("sale", {"total": i})) == "ok"
        db = open_database(f"sqlite:///{fleet.root / 'head-office.db'}")
        try:
            wait_for(lambda: one(db, "SELECT count(*) FROM events WHERE store_id = 'store-a'") == 20, 30,
                     what="the store's events in hq.toml's database")
        finally:
            db.close()
        assert not (elsewhere / "storelink-hq.db").exists()
        serve = ServeProcess(elsewhere, None, env=env)
        status, page = serve.get("/api/v1/fleet")
        assert status == 200 and [s["store_id"] for s in page["stores"]] == ["store-a"]
        assert ingest.terminate() == 0

        # What it cannot use, said in one line: a flag overriding the file, then each part it needs.
        closed = f"127.0.0.1:{free_port()}"
        failed(fleet.hq("ingest", "--broker", closed), 69, "storelink hq ingest: connection refused by " + closed)
        failed(fleet.hq("ingest", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key",
                        str(tmp_path / "missing.key")), 1, "broker.tls.cert/key")
        failed(fleet.hq("ingest", "--database", f"postgresql://hq@127.0.0.1:{free_port()}/storelink"), 69,
               "storelink hq ingest: cannot connect to PostgreSQL")
        failed(fleet.hq("ingest", "--broker", f"127.0.0.1:{fleet.port}", "--database", f"sqlite:///{tmp_path / 'x.db'}",
                        STORELINK_HQ_CONFIG=""), 69, "closed the connection without answering", "broker.tls")
        assert not (tmp_path / "x.db").exists()  # the broker is tried first: nothing is created for nothing
        failed(fleet.hq("serve", "--database", "mysql://db/x"), 1, "database.url: must start with postgresql://")
    finally:
        store.close()
        if serve is not None:
            serve.stop()
        ingest.stop()
        broker.stop()
