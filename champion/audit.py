"""The append-only audit history of alias changes, in sqlite (default) or PostgreSQL (by URL).

Every alias move happens inside `AuditLog.lock(model)`: a per-model lock (a PostgreSQL session advisory
lock, or a file lock beside the sqlite file), so concurrent promotions from many processes serialise and
the history stays a consistent chain. Under the lock a move is written as an intent first ("pending"),
then made, then marked "done"; the next holder settles any intent a killed process left (champion/repair).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from champion.db import create_tables, engine_for, sqlite_path

_metadata = sa.MetaData()
alias_events = sa.Table(
    "champion_alias_events",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),  # assign | promote | rollback | adopt | canary_* ...
    sa.Column("from_version", sa.String(32)),
    sa.Column("to_version", sa.String(32)),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),  # JSON
    # Written "pending" before the alias moves and "done" after, so that after a crash the next operation
    # can tell a move that happened (the alias is on to_version: done) from one that did not (aborted).
    # Only done events are the history.
    sa.Column("status", sa.String(16), nullable=False, server_default="done"),
)
# A registration in progress: written before the version is created and closed after its alias moved, so a
# version whose process died in between is found (by its `champion.registration` tag) and rolled back.
_STATUS_COLUMN = "status VARCHAR(16) NOT NULL DEFAULT 'done'"
registrations = sa.Table(
    "champion_registrations",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("model_uri", sa.Text, nullable=False),
    sa.Column("created_model", sa.Boolean, nullable=False),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending | done | rolled_back
    sa.Column("version", sa.String(32)),
    sa.Column("note", sa.Text),
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
    except OSError:  # no login terminal: cron, containers, systemd services
        user = _account_name()
    return f"{user}@{os.uname().nodename}"


def _account_name() -> str:
    """The account's user name; a bare uid only when the system has no name for it (an audit wants names)."""
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no passwd entry, as containers run with `--user 1234`
        return os.environ.get("USER") or os.environ.get("LOGNAME") or f"uid{uid}"


class AuditLog:
    """A thin interface over the audit table; inject a URL to switch sqlite for PostgreSQL."""

    def __init__(self, url: str):
        self.url = url
        self.engine = engine_for(url)
        self._sqlite_path = sqlite_path(self.engine)
        self._held = threading.local()
        create_tables(self.engine, _metadata, upgrade=_add_status_column)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def lock(self, model_name: str, alias: str | None = None) -> Iterator[LockedHistory]:
        """Serialise registry changes to one model across processes (re-entrant within a thread).

        Held across several short transactions: an intent row commits before the change it announces, so
        whoever takes the lock next and finds a pending row knows its writer died (a live one holds it).
        """
        depth = self._held.__dict__.setdefault("depth", {})
        if depth.get(model_name):
            depth[model_name] += 1
            try:
                yield LockedHistory(self, model_name, alias, fresh=False)
            finally:
                depth[model_name] -= 1
            return
        with self._file_lock(), self._pg_lock(model_name):
            depth[model_name] = 1
            try:
                yield LockedHistory(self, model_name, alias, fresh=True)
            finally:
                depth.pop(model_name, None)

    @contextmanager
    def _pg_lock(self, model_name: str) -> Iterator[None]:
        """A session-level advisory lock on its own connection; released if this process dies."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            key = {"k": _lock_key(model_name)}
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), key)
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), key)

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

    def models_with_pending(self) -> list[str]:
        """Models with an alias move or a registration that was announced and never settled."""
        with self.engine.connect() as conn:
            moves = conn.execute(
                sa.select(alias_events.c.model_name).where(alias_events.c.status == "pending").distinct()
            ).scalars()
            regs = conn.execute(
                sa.select(registrations.c.model_name).where(registrations.c.status == "pending").distinct()
            ).scalars()
            return sorted(set(moves) | set(regs))

    def latest_event_id(self, model_name: str) -> int | None:
        """The id of the model's newest alias event: a cheap token that changes with every audited move."""
        query = sa.select(sa.func.max(alias_events.c.id)).where(
            alias_events.c.model_name == model_name, alias_events.c.status == "done"
        )
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def aliases(self, model_name: str) -> dict[str, str]:
        """{alias: version} as the audit history names them: each alias's newest done move, if it points
        somewhere. A move Champion only noticed afterwards (`external`, written by older releases) names
        nothing: an alias set outside Champion counts once a person adopts it (`champion adopt`)."""
        e = alias_events.c
        newest = (
            sa.select(sa.func.max(e.id))
            .where(e.model_name == model_name, e.status == "done", e.action != "external")
            .group_by(e.alias)
        )
        query = sa.select(e.alias, e.to_version).where(e.id.in_(newest))
        with self.engine.connect() as conn:
            return {alias: version for alias, version in conn.execute(query) if version is not None}

    def has_pending(self, model_name: str) -> bool:
        """Is an alias move of the model announced and not yet settled (a live writer's, or a dead one's)?"""
        e = alias_events.c
        query = sa.select(e.id).where(e.model_name == model_name, e.status == "pending").limit(1)
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def event(self, event_id: int) -> AliasEvent | None:
        """One alias event by its id, whatever its status."""
        query = sa.select(alias_events).where(alias_events.c.id == event_id)
        with self.engine.connect() as conn:
            rows = _event_rows(conn.execute(query).mappings())
        return rows[0] if rows else None

    def assigned_at(self, model_name: str, alias: str, version: str) -> int | None:
        """The id of the newest done event that pointed `alias` at `version` (None if none is audited)."""
        e = alias_events.c
        query = sa.select(sa.func.max(e.id)).where(
            e.model_name == model_name, e.alias == alias, e.to_version == version, e.status == "done"
        )
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


class LockedHistory:
    """The audit rows of one model while its lock is held; every write commits at once.

    `fresh` is True for the outermost holder: only it may treat pending rows as left by a dead process.
    """

    def __init__(self, log: AuditLog, model_name: str, alias: str | None, fresh: bool):
        self._log, self.model_name, self.alias, self.fresh = log, model_name, alias, fresh

    def events(self, alias: str | None = None) -> list[AliasEvent]:
        with self._log.engine.connect() as conn:
            return _select_events(conn, self.model_name, alias or self.alias)

    def append(self, event: AliasEvent, status: str = "done") -> AliasEvent:
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
            "status": status,
        }
        with self._log.engine.begin() as conn:
            new_id = conn.execute(alias_events.insert().values(**values)).inserted_primary_key[0]
        return AliasEvent(**{**event.__dict__, "id": int(new_id)})

    def pending(self) -> list[AliasEvent]:
        """Alias moves announced but never marked done or aborted (their writer died)."""
        with self._log.engine.connect() as conn:
            return _select_events(conn, self.model_name, None, status="pending")

    def settle(self, event_id: int, status: str) -> None:
        """Mark an announced alias move `done` (it happened) or `aborted` (it did not)."""
        with self._log.engine.begin() as conn:
            conn.execute(alias_events.update().where(alias_events.c.id == event_id).values(status=status))

    def begin_registration(self, alias: str, model_uri: str, created_model: bool, actor: str) -> int:
        values = {
            "model_name": self.model_name, "alias": alias, "model_uri": model_uri,
            "created_model": created_model, "actor": actor, "at": datetime.now(UTC), "status": "pending",
        }  # fmt: skip
        with self._log.engine.begin() as conn:
            return int(conn.execute(registrations.insert().values(**values)).inserted_primary_key[0])

    def end_registration(
        self, registration_id: int, status: str, version: str | None, note: str = ""
    ) -> None:
        with self._log.engine.begin() as conn:
            conn.execute(
                registrations.update()
                .where(registrations.c.id == registration_id)
                .values(status=status, version=version, note=note or None)
            )

    def pending_registrations(self) -> list[dict[str, Any]]:
        query = sa.select(registrations).where(
            registrations.c.model_name == self.model_name, registrations.c.status == "pending"
        )
        with self._log.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query.order_by(registrations.c.id)).mappings()]


def _select_events(
    conn: sa.Connection, model_name: str, alias: str | None, status: str = "done"
) -> list[AliasEvent]:
    query = sa.select(alias_events).where(
        alias_events.c.model_name == model_name, alias_events.c.status == status
    )
    if alias is not None:
        query = query.where(alias_events.c.alias == alias)
    return _event_rows(conn.execute(query.order_by(alias_events.c.id)).mappings())


def _event_rows(rows) -> list[AliasEvent]:
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


def _add_status_column(conn: sa.Connection) -> None:
    """A history written before intents lacks `status`: every row in it is done."""
    if "status" not in {c["name"] for c in sa.inspect(conn).get_columns(alias_events.name)}:
        conn.execute(sa.text(f"ALTER TABLE {alias_events.name} ADD COLUMN {_STATUS_COLUMN}"))


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock."""
    return int.from_bytes(hashlib.sha256(f"champion:{name}".encode()).digest()[:8], "big", signed=True)
