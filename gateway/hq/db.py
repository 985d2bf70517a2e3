"""Head office's database: one small interface, two backends (embedded SQLite for a pilot, PostgreSQL for a fleet).

Everything above this module writes portable SQL with ``?`` placeholders, ``ON CONFLICT`` upserts and plain
types (text, bigint, double precision epoch seconds, integers for flags); the backends differ only in how they
connect, how placeholders and column types are spelt, how a bulk insert is sent and how a named lock is taken.

    sqlite:///var/lib/storelink-hq/hq.db   (or a plain path)  one file, WAL, synchronous=FULL
    postgresql://user@host:5432/storelink                   psycopg 3 (the [hq] extra)

A commit here is durable before it returns (SQLite ``synchronous=FULL``; PostgreSQL's default
``synchronous_commit=on``): the ingest acknowledges a message to the broker only after that.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from storelink.hq.config import HqConfig
from storelink.system.sqlite import DatabaseSettingsError, open_db

Row = tuple[Any, ...]
DEFAULT_DATABASE = "sqlite:///storelink-hq.db"  # a pilot: one file in the working directory


class DatabaseError(Exception):
    """The database cannot be opened or refused a statement; the message says which and why."""


class Database(Protocol):
    """The storage interface: the only thing the ingest, the tracker and the dashboard know of a database."""

    dialect: str  # "sqlite" or "postgresql"
    url: str

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Everything inside commits together (durably) or not at all; nests as a savepoint."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement; returns the rows it changed."""

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """One statement for many rows (sent in one round trip where the driver can); returns rows changed."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def insert_ignore(self, table: str, columns: Sequence[str], key: str, rows: Sequence[Sequence[Any]]) -> int:
        """Insert rows, skipping those whose `key` is taken (ON CONFLICT DO NOTHING); returns how many were new.
        The bulk path of the ingest: call it inside a transaction."""

    def try_lock(self, name: str) -> bool:
        """A lock named `name` held by this connection until it closes, if nobody else holds it."""

    def close(self) -> None: ...


def loads(value: Any) -> Any:
    """A JSON column as Python: PostgreSQL's jsonb arrives decoded, SQLite's text does not."""
    if value is None or not isinstance(value, str | bytes):
        return value
    return json.loads(value)


# Column types as each backend spells them; schema.py writes {json}, {id} and so on.
TYPES = {
    "sqlite": {"json": "TEXT", "id": "INTEGER PRIMARY KEY AUTOINCREMENT", "bigint": "INTEGER",
               "double": "REAL", "text": "TEXT", "int": "INTEGER"},
    "postgresql": {"json": "JSONB", "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "bigint": "BIGINT",
                   "double": "DOUBLE PRECISION", "text": "TEXT", "int": "INTEGER"},
}


class SqliteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path):
        self.url = f"sqlite:///{path}"
        self.path = path
        self._depth = 0
        self._lock = threading.RLock()  # one connection; the dashboard's threads take turns on it
        try:
            self.conn = open_db(path, synchronous="FULL")  # WAL and FULL, both checked (storelink.system.sqlite)
        except DatabaseSettingsError as err:
            raise DatabaseError(str(err)) from None
        except sqlite3.Error as err:
            raise DatabaseError(f"{path}: {err}") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            top = self._depth == 0
            self._depth += 1
            try:
                self.conn.execute("BEGIN IMMEDIATE" if top else f"SAVEPOINT s{self._depth}")
                try:
                    yield
                except BaseException:
                    self.conn.execute("ROLLBACK" if top else f"ROLLBACK TO s{self._depth}")
                    if not top:
                        self.conn.execute(f"RELEASE s{self._depth}")
                    raise
                self.conn.execute("COMMIT" if top else f"RELEASE s{self._depth}")
            except sqlite3.Error as err:
                raise DatabaseError(f"{self.path}: {err}") from err
            finally:
                self._depth -= 1

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            try:
                return self.conn.execute(sql, params).rowcount
            except sqlite3.Error as err:
                raise DatabaseError(f"{self.path}: {err}") from err

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        with self._lock:
            try:
                return self.conn.executemany(sql, rows).rowcount
            except sqlite3.Error as err:
                raise DatabaseError(f"{self.path}: {err}") from err

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.Error as err:
                raise DatabaseError(f"{self.path}: {err}") from err

    def insert_ignore(self, table: str, columns: Sequence[str], key: str, rows: Sequence[Sequence[Any]]) -> int:
        marks = ", ".join("?" * len(columns))
        return self.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
                                f"ON CONFLICT ({key}) DO NOTHING", rows)

    def try_lock(self, name: str) -> bool:
        return True  # one file, one process: BEGIN IMMEDIATE already serialises writers

    def close(self) -> None:
        with self._lock:
            self.conn.close()


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str, *, password: str | None = None, readonly: bool = False,
                 application: str = "storelink-hq"):
        try:
            import psycopg
        except ImportError:
            raise DatabaseError("PostgreSQL needs psycopg 3: pip install 'storelink[hq]'") from None
        self.url = url
        self._psycopg = psycopg
        self._sql: dict[str, str] = {}
        self._lock = threading.RLock()
        try:
            extra: dict[str, Any] = {"password": password} if password else {}  # else PGPASSWORD/~/.pgpass
            self.conn = psycopg.connect(url, autocommit=True, application_name=application, connect_timeout=10,
                                        **extra)
            if readonly:
                self.conn.execute("SET default_transaction_read_only = on")
        except psycopg.Error as err:
            raise DatabaseError(f"cannot connect to PostgreSQL ({_redact(url)}): {_first_line(err)}") from None

    def _pg(self, sql: str) -> str:
        text = self._sql.get(sql)
        if text is None:
            text = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return text

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            try:
                with self.conn.transaction():
                    yield
            except self._psycopg.Error as err:
                raise DatabaseError(f"PostgreSQL: {_first_line(err)}") from err

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            try:
                cur = self.conn.execute(self._pg(sql), params)
                return int(cur.rowcount)
            except self._psycopg.Error as err:
                raise DatabaseError(f"PostgreSQL: {_first_line(err)}") from err

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        with self._lock:
            try:
                with self.conn.cursor() as cur:
                    cur.executemany(self._pg(sql), rows)  # pipelined: one round trip
                    return int(cur.rowcount)
            except self._psycopg.Error as err:
                raise DatabaseError(f"PostgreSQL: {_first_line(err)}") from err

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            try:
                return list(self.conn.execute(self._pg(sql), params).fetchall())
            except self._psycopg.Error as err:
                raise DatabaseError(f"PostgreSQL: {_first_line(err)}") from err

    def insert_ignore(self, table: str, columns: Sequence[str], key: str, rows: Sequence[Sequence[Any]]) -> int:
        # COPY into a temporary table, then one INSERT ... SELECT ... ON CONFLICT DO NOTHING: 1.3-2x the rows/s of
        # a pipelined executemany here (bench/fleet.py), and duplicates within the batch are skipped too.
        if not rows:
            return 0
        cols = ", ".join(columns)
        with self.transaction(), self._lock:
            try:
                with self.conn.cursor() as cur:
                    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS _in_{table} (LIKE {table}) ON COMMIT DELETE ROWS")
                    with cur.copy(f"COPY _in_{table} ({cols}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                    cur.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _in_{table} "
                                f"ON CONFLICT ({key}) DO NOTHING")
                    inserted = int(cur.rowcount)
                    cur.execute(f"TRUNCATE _in_{table}")  # a savepoint's batch must not meet the next one's
                    return inserted
            except self._psycopg.Error as err:
                raise DatabaseError(f"PostgreSQL: {_first_line(err)}") from err

    def try_lock(self, name: str) -> bool:
        # A session-level advisory lock: released when this connection closes, so a worker that dies
        # (kill -9, lost network) hands the job to the next worker that asks.
        return bool(self.query("SELECT pg_try_advisory_lock(hashtext(?))", (f"storelink:{name}",))[0][0])

    def close(self) -> None:
        with self._lock:
            self.conn.close()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _redact(url: str) -> str:
    """The URL without its password (it may be in the log or on the screen)."""
    head, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{head}{sep}{creds.split(':', 1)[0]}:***@{host}"


def open_database(url: str, *, password: str | None = None, readonly: bool = False,
                  application: str = "storelink-hq") -> Database:
    """`postgresql://...` or `postgres://...` opens PostgreSQL; `sqlite:///path` or a path opens SQLite."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, password=password, readonly=readonly, application=application)
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url.removeprefix("sqlite:")
    if "://" in path:
        raise DatabaseError(f"database {url!r}: use postgresql://... or sqlite:///path/to/file.db")
    if readonly and not Path(path).exists():
        raise DatabaseError(f"{path}: no such database (start `storelink hq ingest` first: it creates it)")
    return SqliteDatabase(Path(path))  # read-only use is the caller's: the dashboard only reads


def open_configured(cfg: HqConfig, *, readonly: bool = False, application: str = "storelink-hq") -> Database:
    """The database hq.toml's [database] names (``--database`` overrides it), else the embedded default file."""
    return open_database(cfg.database_url or DEFAULT_DATABASE, password=cfg.database_password(), readonly=readonly,
                         application=application)
