"""The append-only audit history of alias changes, in sqlite (default) or PostgreSQL (by URL).

Every alias move happens inside `AuditLog.lock(model, alias)`: a per-model lock (a PostgreSQL advisory
lock, or a file lock beside the sqlite file) held in the same transaction that appends the event, so
concurrent promotions from many processes serialise and the history stays a consistent chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

_metadata = sa.MetaData()
alias_events = sa.Table(
    "champion_alias_events",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),  # assign | promote | rollback | external
    sa.Column("from_version", sa.String(32)),
    sa.Column("to_version", sa.String(32)),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),  # JSON
)
# The loop's other steps, in the same store: drift alarms, retrains, gate verdicts. `champion history` shows
# them in time order with the alias moves, so one loop iteration reads as one story.
loop_events = sa.Table(
    "champion_loop_events",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),  # drift | retrain_started | retrain_finished | gate
    sa.Column("version", sa.String(32)),  # the version the step is about, if one
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("summary", sa.Text, nullable=False),  # one sentence
    sa.Column("evidence", sa.Text, nullable=False),  # JSON
    sa.Column("trigger_key", sa.String(256)),
)

# One row per retrain attempt. The unique trigger key is the idempotency key: the same trigger (one drift
# alarm, one cron slot) can start at most one retrain, whatever the number of schedulers or restarts.
retrain_runs = sa.Table(
    "champion_retrains",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("trigger_key", sa.String(256), nullable=False, unique=True),
    sa.Column("trigger", sa.String(32), nullable=False),  # drift | schedule | manual | performance
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    sa.Column("outcome", sa.String(32)),  # None while running; promoted | canary | refused | failed | ...
    sa.Column("challenger_version", sa.String(32)),
    sa.Column("detail", sa.Text),  # one sentence
    sa.Column("pid", sa.Integer),
    sa.Column("host", sa.String(256)),
)


@dataclass(frozen=True)
class LoopEvent:
    model_name: str
    kind: str
    summary: str
    version: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    actor: str = ""
    trigger_key: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: int | None = None


@dataclass(frozen=True)
class AliasEvent:
    model_name: str
    alias: str
    action: str
    from_version: str | None
    to_version: str | None
    actor: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: int | None = None


def current_actor() -> str:
    """Who is acting: `CHAMPION_ACTOR` if set (CI, schedulers), else user@host."""
    if actor := os.environ.get("CHAMPION_ACTOR"):
        return actor
    try:
        user = os.getlogin()
    except OSError:
        user = os.environ.get("USER") or str(os.getuid())
    return f"{user}@{os.uname().nodename}"


class AuditLog:
    """A thin interface over the audit table; inject a URL to switch sqlite for PostgreSQL."""

    def __init__(self, url: str):
        self.url = url
        self.engine = sa.create_engine(url, future=True, pool_pre_ping=True)
        self._sqlite_path = None
        if self.engine.dialect.name == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            self._sqlite_path = Path(self.engine.url.database)
            self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":  # two processes creating the table at once collide
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key("create")})
            _metadata.create_all(conn, checkfirst=True)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def lock(self, model_name: str, alias: str) -> Iterator[_LockedHistory]:
        """Serialise alias changes for one model across processes; appends commit when the block exits."""
        with self._file_lock(), self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(model_name)})
            yield _LockedHistory(conn, model_name, alias)

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self._sqlite_path is None:
            yield
            return
        with open(self._sqlite_path.with_suffix(".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def events(self, model_name: str, alias: str | None = None) -> list[AliasEvent]:
        with self.engine.connect() as conn:
            return _select_events(conn, model_name, alias)

    def latest_event_id(self, model_name: str) -> int | None:
        """The id of the model's newest alias event: a cheap token that changes with every audited move."""
        query = sa.select(sa.func.max(alias_events.c.id)).where(alias_events.c.model_name == model_name)
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def record(self, event: LoopEvent) -> LoopEvent:
        """Append one step of the loop (drift, retrain, gate) to the history."""
        values = {
            "model_name": event.model_name,
            "kind": event.kind,
            "version": event.version,
            "actor": event.actor or current_actor(),
            "at": event.at,
            "summary": event.summary,
            "evidence": json.dumps(event.evidence, sort_keys=True, default=str),
            "trigger_key": event.trigger_key,
        }
        with self.engine.begin() as conn:
            new_id = conn.execute(loop_events.insert().values(**values)).inserted_primary_key[0]
        return LoopEvent(**{**event.__dict__, "actor": values["actor"], "id": int(new_id)})

    def loop_events(self, model_name: str) -> list[LoopEvent]:
        query = sa.select(loop_events).where(loop_events.c.model_name == model_name)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(loop_events.c.id)).mappings().all()
        return [
            LoopEvent(
                model_name=r["model_name"], kind=r["kind"], summary=r["summary"], version=r["version"],
                evidence=json.loads(r["evidence"]), actor=r["actor"], trigger_key=r["trigger_key"],
                at=_aware(r["at"]), id=r["id"],
            )
            for r in rows
        ]  # fmt: skip


class _LockedHistory:
    def __init__(self, conn: sa.Connection, model_name: str, alias: str):
        self._conn, self.model_name, self.alias = conn, model_name, alias

    def events(self) -> list[AliasEvent]:
        return _select_events(self._conn, self.model_name, self.alias)

    def append(self, event: AliasEvent) -> AliasEvent:
        values = {
            "model_name": event.model_name,
            "alias": event.alias,
            "action": event.action,
            "from_version": event.from_version,
            "to_version": event.to_version,
            "actor": event.actor,
            "at": event.at,
            "reason": event.reason,
            "evidence": json.dumps(event.evidence, sort_keys=True, default=str),
        }
        new_id = self._conn.execute(alias_events.insert().values(**values)).inserted_primary_key[0]
        return AliasEvent(**{**event.__dict__, "id": int(new_id)})


def _select_events(conn: sa.Connection, model_name: str, alias: str | None) -> list[AliasEvent]:
    query = sa.select(alias_events).where(alias_events.c.model_name == model_name)
    if alias is not None:
        query = query.where(alias_events.c.alias == alias)
    rows = conn.execute(query.order_by(alias_events.c.id)).mappings()
    return [
        AliasEvent(
            id=row["id"],
            model_name=row["model_name"],
            alias=row["alias"],
            action=row["action"],
            from_version=row["from_version"],
            to_version=row["to_version"],
            actor=row["actor"],
            at=_aware(row["at"]),
            reason=row["reason"],
            evidence=json.loads(row["evidence"]),
        )
        for row in rows
    ]


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # sqlite hands back naive UTC


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock."""
    return int.from_bytes(hashlib.sha256(f"champion:{name}".encode()).digest()[:8], "big", signed=True)
