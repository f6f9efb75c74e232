"""One way to open a store: `engine_for(url)`, and `create_tables` under one lock on sqlite and PostgreSQL.

Every table set (audit, pending approvals, inference log, review queue, drift checks, job runs, fresh labels)
opens its engine and creates its tables here, so processes that start at once on an empty store never
collide: on PostgreSQL they queue on a transaction-scoped advisory lock, on sqlite on a file lock beside
the database file. A store's in-place upgrades of older tables run under the same lock.

    engine = engine_for(url)
    create_tables(engine, metadata, upgrade=_add_missing_columns)
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

SQLITE_BUSY_TIMEOUT_MS = 5_000  # writers in other processes wait for each other this long
# pg_advisory_xact_lock key of table creation: the first 8 bytes of sha256("champion.db:create_tables"),
# signed; apart from the audit's per-model keys (sha256 of "champion:<model>"), which a holder may keep
# while it opens a table set
CREATE_LOCK_KEY = 0x369457F98885A89C


def engine_for(url: str) -> sa.Engine:
    """An engine for a store's URL; a sqlite file gets its folder (private under `secure_home`'s umask),
    write-ahead logging (readers never block the writer) and a busy timeout."""
    engine = sa.create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        path = sqlite_path(engine)
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def sqlite_path(engine: sa.Engine) -> Path | None:
    """The database file of a sqlite engine; None for an in-memory one or another database."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or database in (None, "", ":memory:"):
        return None
    return Path(database)


def create_tables(
    engine: sa.Engine, metadata: sa.MetaData, upgrade: Callable[[sa.Connection], None] | None = None
) -> None:
    """Create the missing tables of `metadata`, then run `upgrade` (a store's changes to its older tables),
    in one transaction under the creation lock: a second process waits, then finds the tables made."""
    with _file_lock(sqlite_path(engine)), engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": CREATE_LOCK_KEY})
        metadata.create_all(conn, checkfirst=True)
        if upgrade is not None:
            upgrade(conn)


@contextmanager
def _file_lock(database: Path | None) -> Iterator[None]:
    """flock on `<database>.lock`, a file of its own: the audit's per-model lock is `<stem>.lock`."""
    if database is None:
        yield
        return
    with open(f"{database}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")  # first: switching to WAL may wait
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
