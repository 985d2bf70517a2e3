"""The price database's connections across threads: closing it while another thread is in the middle of a read
(the status build in a worker thread when the gateway stops) must neither crash the process nor break that read.
Closing a sqlite3 connection that another thread is using segfaulted a test worker once (prices/state.py's build
racing PriceDb.close)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from storelink.prices.db import PriceDb, get_meta, set_meta


def test_a_read_in_flight_when_the_database_closes_finishes_on_its_own_connection(tmp_path: Path) -> None:
    db = PriceDb(tmp_path / "prices.db")
    db.open()
    writer = sqlite3.connect(db.path)
    set_meta(writer, "active_version", 7)
    writer.commit()
    writer.close()

    inside, closed = threading.Event(), threading.Event()
    result: list[str | None] = []
    errors: list[BaseException] = []

    def read_across_close() -> None:
        try:
            conn = db.reader()
            result.append(get_meta(conn, "active_version"))
            inside.set()
            assert closed.wait(10)
            result.append(get_meta(conn, "active_version"))  # the same connection, after close()
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    reader = threading.Thread(target=read_across_close)
    reader.start()
    assert inside.wait(10)
    db.close()
    closed.set()
    reader.join(10)
    assert not errors, errors
    assert result == ["7", "7"]


def test_a_thread_gets_a_fresh_reader_after_close(tmp_path: Path) -> None:
    first = PriceDb(tmp_path / "prices.db")
    first.open()
    old = first.reader()
    first.close()
    fresh = first.reader()  # this thread's reader from before close() is replaced, not reused
    assert fresh is not old
    with pytest.raises(sqlite3.ProgrammingError):  # closed by its own thread when it was replaced
        old.execute("SELECT 1")
    assert get_meta(fresh, "missing", "none") == "none"
