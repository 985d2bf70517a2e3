"""The outbox on its own: durability rules, gap-free seq, the size cap and a full disk."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import time
from pathlib import Path

import pytest

from storelink.config import StorageConfig
from storelink.contract import EvictionReport, OutboxStatePayload
from storelink.outbox import EventRejected, Outbox, OutboxError, OutboxFull
from storelink.outbox_rows import PendingEvent


def make(tmp_path: Path, **kw: object) -> Outbox:
    ob = Outbox(StorageConfig(path=tmp_path / "ob.db", **kw))  # type: ignore[arg-type]
    ob.open()
    return ob


async def test_seq_is_gap_free_and_survives_reopen(tmp_path: Path) -> None:
    ob = make(tmp_path)
    first = await asyncio.gather(*(ob.put("sale", "till-1", {"n": i}) for i in range(50)))
    assert sorted(a.seq for a in first) == list(range(1, 51))
    ob.ack([a.seq for a in first])  # delivered and deleted: the counter must not restart at 1
    ob.close()
    ob = make(tmp_path)
    again = await ob.put("sale", "till-1", {"n": 50})
    assert again.seq == 51
    assert ob.stats.depth == 1
    ob.close()


async def test_payload_is_the_published_contract(tmp_path: Path) -> None:
    ob = make(tmp_path)
    acc = await ob.put("sale", "till-1", {"total": 1299, "text": "Crème brûlée"})
    [ev] = ob.read_after(0, 10)
    body = json.loads(ev.payload)
    assert set(body) == {"id", "seq", "ts", "kind", "device", "data"}
    assert (body["id"], body["seq"], body["kind"], body["device"]) == (acc.id, acc.seq, "sale", "till-1")
    assert body["data"] == {"total": 1299, "text": "Crème brûlée"} and body["ts"].endswith("Z")
    ob.close()


async def test_data_that_is_not_json_is_refused_and_nothing_written(tmp_path: Path) -> None:
    ob = make(tmp_path)
    with pytest.raises(OutboxError, match="not JSON"):
        await ob.put("sale", "till-1", {"bad": float("nan")})
    with pytest.raises(OutboxError):
        await ob.put("sale", "till-1", {"bad": object()})
    assert ob.stats.depth == 0 and (await ob.put("sale", "t", {})).seq == 1
    ob.close()


async def test_cap_evicts_telemetry_oldest_first_and_never_sales(tmp_path: Path) -> None:
    ob = make(tmp_path, max_events=100)
    sales = [await ob.put("sale", "till-1", {"n": i}) for i in range(30)]
    tele = [await ob.put("telemetry", "pi", {"n": i}) for i in range(70)]
    assert ob.stats.depth == 100 and not ob.stats.alarms
    newer = [await ob.put("telemetry", "pi", {"n": 100 + i}) for i in range(10)]
    more_sales = [await ob.put("sale", "till-1", {"n": 100 + i}) for i in range(20)]
    rows = ob.read_after(0, 1000)
    left = {e.seq for e in rows}
    assert {a.seq for a in sales + more_sales} <= left  # no sale is ever dropped
    # The first eviction is reported at once, in an outbox.evicted event that is critical and takes a place too:
    # so one more telemetry event (31, not 30) made room, the oldest first.
    [report] = [json.loads(e.payload) for e in rows if e.kind == "outbox.evicted"]
    assert report["data"] == {"ranges": [[tele[0].seq, tele[0].seq]], "count": 1, "evicted_total": 1}
    assert {a.seq for a in tele[:31]}.isdisjoint(left)
    assert {a.seq for a in tele[31:] + newer} <= left
    assert ob.stats.evicted_total == 31 and ob.stats.depth == 100
    assert "capacity" in ob.status()["alarms"]
    ob.close()


async def test_evictions_are_reported_exactly_and_survive_a_restart(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every evicted seq is in exactly one outbox.evicted report (interleaved with sales, so in several runs),
    reports are spaced by NOTICE_EVERY, and runs evicted but not yet reported at a restart are reported after it."""
    import storelink.evictions

    monkeypatch.setattr(storelink.evictions, "NOTICE_EVERY", 0.3)
    ob = make(tmp_path, max_events=100)
    accepted = []
    for i in range(80):  # a sale after every second scan: evicted scans come in runs of two
        accepted.append((await ob.put("scan", "s1", {"n": i}), "scan"))
        if i % 2:
            accepted.append((await ob.put("sale", "till-1", {"n": i}), "sale"))
    for i in range(40):
        accepted.append((await ob.put("scan", "s1", {"n": 100 + i}), "scan"))
    ob.close()  # some runs are evicted but not reported yet: the table keeps them across the restart
    ob = make(tmp_path, max_events=100)
    await asyncio.sleep(0.6)  # the writer reports what the last run left once NOTICE_EVERY has passed
    rows = ob.read_after(0, 1000)
    reports = [json.loads(e.payload)["data"] for e in rows if e.kind == "outbox.evicted"]
    left = {e.seq for e in rows}
    evicted = {a.seq for a, kind in accepted if a.seq not in left}
    assert evicted and all(kind == "scan" for a, kind in accepted if a.seq in evicted)  # only telemetry
    reported = [s for r in reports for a, b in r["ranges"] for s in range(a, b + 1)]
    assert sorted(reported) == sorted(evicted)  # each exactly once
    assert sum(r["count"] for r in reports) == len(evicted) == ob.stats.evicted_total
    assert reports[-1]["evicted_total"] == len(evicted)
    assert any(b > a for r in reports for a, b in r["ranges"])  # consecutive seqs merged into runs
    report = OutboxStatePayload.model_validate(ob.report())  # the retained outbox/state payload of the contract
    assert report.evicted_total == len(evicted) and report.depth == len(rows)
    assert all(EvictionReport.model_validate(r) for r in reports)
    ob.close()


async def test_full_of_sales_refuses_telemetry_but_still_takes_sales(tmp_path: Path) -> None:
    ob = make(tmp_path, max_events=100)
    for i in range(100):
        await ob.put("sale", "till-1", {"n": i})
    with pytest.raises(OutboxFull, match=r"telemetry|critical"):
        await ob.put("telemetry", "pi", {"cpu": 1})
    extra = await ob.put("sale", "till-1", {"n": 100})  # a sale is never refused for the cap
    assert extra.seq == 101  # the refused telemetry did not use up a number
    status = ob.status()
    assert status["refused_total"] == 1 and "capacity" in status["alarms"]
    ob.close()


async def test_disk_full_refuses_with_a_clear_error_and_keeps_what_was_accepted(tmp_path: Path) -> None:
    ob = make(tmp_path)
    kept = [await ob.put("sale", "till-1", {"n": i}) for i in range(20)]
    assert ob._conn is not None
    pages = ob._conn.execute("PRAGMA page_count").fetchone()[0]
    # max_page_count makes SQLite fail exactly as a full disk does (SQLITE_FULL).
    ob._conn.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(OutboxFull, match="disk full"):
        await ob.put_many([("sale", "till-1", {"blob": "x" * 5000})] * 50)
    assert "storage" in ob.status()["alarms"]
    ob._conn.execute("PRAGMA max_page_count=1073741823")
    after = await ob.put("sale", "till-1", {"n": "after"})
    assert after.seq == kept[-1].seq + 1  # the failed batch gave its numbers back
    assert "storage" not in ob.status()["alarms"]
    ob.close()
    conn = sqlite3.connect(tmp_path / "ob.db")
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 21


async def test_group_commit_batches_concurrent_callers(tmp_path: Path) -> None:
    ob = make(tmp_path)
    await asyncio.gather(*(ob.put("sale", "t", {"n": i}) for i in range(2000)))
    assert ob.stats.depth == 2000
    assert ob.stats.commits_total < 200  # many events per fsync, not one each
    ob.close()


def _wal_size(tmp_path: Path) -> int:
    return (tmp_path / "ob.db-wal").stat().st_size


async def test_a_lone_event_commit_writes_one_page_of_wal(tmp_path: Path) -> None:
    # What keeps flash wear at its floor (docs/appliance.md): a lone event, with the delete of the one delivered
    # before it riding along, appends one 1 KiB page frame to the WAL; no index page, no seq counter row.
    ob = make(tmp_path)
    prev = await ob.put("sale", "till-1", {"n": 0})
    sizes = [_wal_size(tmp_path)]
    for i in range(1, 21):
        ob.ack([prev.seq])
        prev = await ob.put("sale", "till-1", {"n": i, "basket": "x" * 200})
        sizes.append(_wal_size(tmp_path))
    assert {b - a for a, b in itertools.pairwise(sizes)} == {24 + 1024}
    assert ob.stats.depth == 1 and ob.stats.delivered_total == 20
    ob.close()
    conn = sqlite3.connect(tmp_path / "ob.db")
    assert conn.execute("SELECT count(*) FROM meta").fetchone()[0] == 0  # the rows carry the highest seq


async def test_deletes_wait_for_company_but_not_forever(tmp_path: Path) -> None:
    ob = make(tmp_path)
    accepted = [await ob.put("sale", "till-1", {"n": i}) for i in range(5)]
    commits = ob.stats.commits_total
    ob.ack([a.seq for a in accepted])
    await asyncio.sleep(0.2)
    assert ob.stats.depth == 5 and ob.stats.commits_total == commits  # no commit of its own yet
    for _ in range(40):
        if ob.stats.depth == 0:
            break
        await asyncio.sleep(0.05)
    assert ob.stats.depth == 0 and ob.stats.commits_total == commits + 1  # one delete commit after the delay
    ob.close()
    ob = make(tmp_path)  # the newest row was deleted: the meta row keeps the next seq
    assert (await ob.put("sale", "till-1", {})).seq == 6


async def test_an_event_that_cannot_be_stored_is_refused_before_it_is_queued(tmp_path: Path) -> None:
    ob = make(tmp_path)
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    for data in ({"v": "\ud800"}, {"v": float("nan")}, {"v": deep}, {"v": b"bytes"}, {"v": "x" * (2 << 20)}):
        with pytest.raises(EventRejected):
            await ob.put("sale", "till-1", data)
    with pytest.raises(EventRejected):
        await ob.put("sale", "till-\udc80", {})
    assert (await ob.put("sale", "till-1", {"ok": True})).seq == 1  # nothing was queued for the refused ones
    ob.close()


async def test_the_writer_survives_a_row_it_cannot_store(tmp_path: Path) -> None:
    """Even a row that got past the checks (a bug) costs its own caller only: the rest of its batch is stored and
    the writer thread goes on."""
    ob = make(tmp_path)
    loop = asyncio.get_running_loop()
    bad = PendingEvent("f" * 32, time.time(), "sale", "till-\ud800", b"{}", True)  # cannot be encoded as UTF-8
    calls = [([ob._pending("sale", "till-1", {"n": 1})], loop.create_future()), ([bad], loop.create_future()),
             ([ob._pending("sale", "till-1", {"n": 2})], loop.create_future())]
    for pending, fut in calls:  # one batch: queued before the writer takes any of them
        ob._queue.put(("put", (pending, fut, loop)))
    results = await asyncio.gather(*(fut for _p, fut in calls), return_exceptions=True)
    assert isinstance(results[1], OutboxError) and not isinstance(results[1], OutboxFull)
    assert [r[0].seq for r in (results[0], results[2])] == [1, 2]  # type: ignore[index]
    assert ob._thread is not None and ob._thread.is_alive()
    assert (await ob.put("sale", "till-1", {"n": 3})).seq == 3
    assert ob.stats.refused_total == 1 and [e.seq for e in ob.read_after(0, 10)] == [1, 2, 3]
    ob.close()


async def test_a_bad_row_costs_neither_the_waiting_deletes_nor_the_next_seq(tmp_path: Path) -> None:
    """Lazy deletes wait in the writer for the next insert commit; when that batch fails on a row, the deletes are
    committed on their own and the good calls one by one, with the seq the failed batch had taken given back."""
    ob = make(tmp_path)
    delivered = [await ob.put("sale", "till-1", {"n": i}) for i in range(3)]
    ob.ack([a.seq for a in delivered])
    loop = asyncio.get_running_loop()
    bad = PendingEvent("e" * 32, time.time(), "sale", "till-\ud800", b"{}", True)  # cannot be encoded as UTF-8
    calls = [([bad], loop.create_future()), ([ob._pending("sale", "till-1", {"n": 3})], loop.create_future())]
    for pending, fut in calls:
        ob._queue.put(("put", (pending, fut, loop)))
    results = await asyncio.gather(*(fut for _p, fut in calls), return_exceptions=True)
    assert isinstance(results[0], OutboxError) and not isinstance(results[0], OutboxFull)
    assert results[1][0].seq == 4  # type: ignore[index]
    assert ob.stats.depth == 1 and ob.stats.delivered_total == 3 and ob.stats.refused_total == 1
    assert [e.seq for e in ob.read_after(0, 10)] == [4]
    ob.close()
    ob = make(tmp_path)
    assert ob.stats.depth == 1 and (await ob.put("sale", "till-1", {})).seq == 5
    ob.close()
