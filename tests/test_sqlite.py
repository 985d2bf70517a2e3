"""One SQLite helper (storelink.system.sqlite): every database the gateway opens runs WAL with the configured
fsync level, and every write goes through one transaction() that commits or rolls back."""

from __future__ import annotations

import ast
import asyncio
import sqlite3
from pathlib import Path

import pytest

from storelink.app import Gateway
from storelink.config import parse_config
from storelink.drivers.sim.openepaperlink import FakeAccessPoint
from storelink.drivers.sim.zpl_printer import FakeZplPrinter
from storelink.prices.part import PricesPart
from storelink.system.sqlite import DatabaseSettingsError, open_databases, open_db, settings, transaction
from tests.helpers import Mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent


def _connects_outside_the_helper() -> list[str]:
    found = []
    for folder in (ROOT / "gateway", ROOT / "drivers"):
        for py in folder.rglob("*.py"):
            if py == ROOT / "gateway/system/sqlite.py":
                continue
            for node in ast.walk(ast.parse(py.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "connect" and \
                        isinstance(node.value, ast.Name) and node.value.id == "sqlite3":
                    found.append(f"{py.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_module_opens_sqlite_by_itself() -> None:
    assert not _connects_outside_the_helper(), "use storelink.system.sqlite.open_db"


@pytest.mark.parametrize("sync", ["FULL", "NORMAL"])
async def test_every_database_the_gateway_opens_is_wal_with_the_configured_synchronous(
        tmp_path: Path, mosquitto: Mosquitto, sync: str) -> None:
    zpl = await FakeZplPrinter().start()
    ap = await FakeAccessPoint(["00000B57A1B2C3D4"], checkin_delay=0.2).start()
    gw = Gateway(parse_config({
        "store_id": "store-0042",
        "mqtt": {"port": mosquitto.port, "reconnect_min": 0.2, "reconnect_max": 0.5},
        "storage": {"path": str(tmp_path / "data/gw.db"), "synchronous": sync},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "cart": {"enabled": True},  # the kiosk journal too
        "devices": [
            {"id": "labels-1", "driver": "zpl_printer", "host": "127.0.0.1", "port": zpl.port},
            {"id": "esl-ap", "driver": "openepaperlink", "url": ap.url, "tags": {"1001": "0B57A1B2C3D4"}},
        ],
    }))
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    try:
        expected = {"gw.db", "prices.db", "kiosk.db", "zpl-labels-1.db", "esl-esl-ap.db"}
        deadline = asyncio.get_running_loop().time() + 20
        while {p.name for p in (tmp_path / "data").rglob("*.db")} != expected or not gw.ready.is_set():
            assert asyncio.get_running_loop().time() < deadline, sorted((tmp_path / "data").rglob("*.db"))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the drivers' first round: their connections are open
        prices = next(p for p in gw.parts.parts if isinstance(p, PricesPart))
        await asyncio.to_thread(prices.db.reader)  # a reader thread's connection too
        mine = [c for c in open_databases() if tmp_path in c.path.parents]
        assert {c.path.name for c in mine} == expected, [str(c.path) for c in mine]
        for conn in mine:
            got = await asyncio.to_thread(settings, conn)
            assert got["journal_mode"] == "wal" and got["synchronous"] == sync, (conn.path.name, got)
        assert any(c.read_only for c in mine) and all(c.synchronous == sync for c in mine)
    finally:
        stop.set()
        await task
        await zpl.stop()
        await ap.close()


def test_transaction_commits_or_rolls_back(tmp_path: Path) -> None:
    db = open_db(tmp_path / "t.db")
    db.execute("CREATE TABLE t (n INTEGER)")
    with transaction(db):
        db.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(ZeroDivisionError), transaction(db):
        db.execute("INSERT INTO t VALUES (2)")
        _ = 1 / 0
    assert not db.in_transaction
    with transaction(db, durable=False):  # not fsync'd, yet committed; FULL again afterwards
        assert settings(db)["synchronous"] == "NORMAL"
        db.execute("INSERT INTO t VALUES (3)")
    assert settings(db)["synchronous"] == "FULL"
    assert [r[0] for r in db.execute("SELECT n FROM t ORDER BY n")] == [1, 3]
    db.close()
    assert db not in open_databases()


def test_settings_are_checked_after_they_are_set(tmp_path: Path) -> None:
    with pytest.raises(DatabaseSettingsError, match="WAL"):
        open_db(Path(":memory:"))  # an in-memory database cannot run a WAL
    with pytest.raises(ValueError, match="synchronous"):
        open_db(tmp_path / "x.db", synchronous="OFF")  # type: ignore[arg-type]


def test_a_small_database_is_rebuilt_with_the_page_size_asked_for(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, s TEXT)")
    old.executemany("INSERT INTO t VALUES (?, ?)", [(i, "x" * 50) for i in range(2000)])
    old.commit()
    assert old.execute("PRAGMA page_size").fetchone()[0] == 4096
    old.close()
    db = open_db(tmp_path / "old.db", page_size=1024)
    assert settings(db)["page_size"] == 1024 and settings(db)["journal_mode"] == "wal"
    assert db.execute("SELECT count(*), sum(n) FROM t").fetchone() == (2000, sum(range(2000)))
    db.close()
    fresh = open_db(tmp_path / "new.db", page_size=2048)
    fresh.execute("CREATE TABLE t (n INTEGER)")
    assert settings(fresh)["page_size"] == 2048
    fresh.close()
