"""Schema versions of the gateway's SQLite files (outbox, price book, kiosk journal), and the rule for rollbacks.

Each database records, in a one-row-per-database table ``schema_info``, the schema ``version`` it was last
written with and ``readable_by``: the oldest schema version whose code can still read and write it. A release
only ever migrates forward; a migration that the previous release can still use (a new nullable column, a new
table) keeps ``readable_by`` where it was, one that it cannot (a column renamed, a meaning changed) raises it.

Opening a database:
- older than this code: migrated forward, one step per version, each in its own transaction;
- newer than this code (a rollback after an update): used as it is when ``readable_by`` allows it, otherwise
  refused with a clear error (``SchemaTooNew``), never silently misread.

A release bundle's manifest carries ``SCHEMAS`` of the release (gateway/update/manifest.py), so the updater
knows before it installs anything whether rolling back past it would still work. This module imports nothing
else from StoreLink: the release builder reads it straight out of a wheel.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Migration = Callable[[sqlite3.Connection], object]


@dataclass(frozen=True)
class Schema:
    version: int  # what this code writes
    readable_by: int  # the oldest schema version whose code can still use what this code writes
    migrates_from: int  # the oldest version this code can migrate forward from


# The schema of every database this release writes. Bump `version` with each change, add the migration to the
# database's own MIGRATIONS, and raise `readable_by` only when the previous release could no longer use the file.
SCHEMAS: dict[str, Schema] = {
    "outbox": Schema(version=1, readable_by=1, migrates_from=1),
    "prices": Schema(version=2, readable_by=1, migrates_from=1),  # 2: journal columns of issue 12 (nullable)
    "kiosk": Schema(version=1, readable_by=1, migrates_from=1),
}


class SchemaTooNew(Exception):
    """The database was written by a newer release that this one cannot read (rolled back too far)."""


def _info(conn: sqlite3.Connection, name: str) -> tuple[int, int] | None:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_info(name TEXT PRIMARY KEY, version INTEGER NOT NULL, "
                 "readable_by INTEGER NOT NULL)")
    row = conn.execute("SELECT version, readable_by FROM schema_info WHERE name=?", (name,)).fetchone()
    return (int(row[0]), int(row[1])) if row else None


def ensure_schema(conn: sqlite3.Connection, name: str, create: Callable[[sqlite3.Connection], object],
                  migrations: Mapping[int, Migration] | None = None, schemas: Mapping[str, Schema] = SCHEMAS,
                  ) -> int:
    """Create, migrate forward, or accept a newer-but-readable database; returns the version now on disk.

    ``create`` makes the current schema (idempotent: ``CREATE ... IF NOT EXISTS``). ``migrations[v]`` brings a
    database from version v-1 to v. A database from before schema versions existed (tables but no
    ``schema_info`` row) has version 1: the schema every release before versioning wrote.
    """
    mine = schemas[name]
    found = _info(conn, name)
    if found is None:
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND name!='schema_info'"
                              ).fetchone()[0]
        found = (1, 1) if tables else (mine.version, mine.readable_by)
        conn.execute("INSERT INTO schema_info(name, version, readable_by) VALUES(?, ?, ?)", (name, *found))
    version, readable_by = found
    if version > mine.version:
        if readable_by > mine.version:
            raise SchemaTooNew(
                f"the {name} database has schema version {version}, written by a newer StoreLink, and is readable "
                f"only by schema {readable_by} or later; this release knows schema {mine.version}")
        create(conn)  # tables this release expects that the newer one may not have kept
        return version
    if version < mine.migrates_from:
        raise SchemaTooNew(f"the {name} database has schema version {version}; this release migrates only from "
                           f"{mine.migrates_from} on (install the intermediate release first)")
    for step in range(version + 1, mine.version + 1):
        migrate = (migrations or {}).get(step)
        if migrate is None:
            raise SchemaTooNew(f"no migration of the {name} database to schema version {step}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrate(conn)
            conn.execute("UPDATE schema_info SET version=?, readable_by=max(readable_by, ?) WHERE name=?",
                         (step, mine.readable_by, name))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    create(conn)
    return mine.version


def schemas_as_dict(schemas: Mapping[str, Schema] = SCHEMAS) -> dict[str, dict[str, int]]:
    return {name: {"version": s.version, "readable_by": s.readable_by, "migrates_from": s.migrates_from}
            for name, s in schemas.items()}


def rollback_problems(running: Mapping[str, Mapping[str, int]], new: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Why the release running now could not read the files `new` writes (empty: a rollback is safe)."""
    problems = []
    for name, target in new.items():
        have = running.get(name)
        if have is None:
            continue  # a database the running release does not use at all
        if int(target["readable_by"]) > int(have["version"]):
            problems.append(f"{name}: schema {target['version']} is readable only by schema "
                            f"{target['readable_by']}+, the running release has {have['version']}")
    return problems
