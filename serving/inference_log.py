"""The inference log: every prediction, and the true labels that arrive later, in sqlite or PostgreSQL.

`append` only puts records on a bounded in-memory queue; one writer thread commits them in batches, so
the request path never waits on the database unless the queue is full (then it waits: nothing is
dropped). A failed write is retried with backoff until it commits, and `close` drains what is left.
Monitoring reads the log back with `read`, one row per prediction with its latest feedback label.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from champion.audit import current_actor
from champion.errors import ChampionError

if TYPE_CHECKING:
    import pandas

logger = logging.getLogger(__name__)

ARMS = ("champion", "challenger", "canary", "shadow")
_SQLITE_BUSY_TIMEOUT_MS = 5_000
_RETENTION_EVERY_S = 3600.0
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.1, 5.0

_metadata = sa.MetaData()
predictions = sa.Table(
    "champion_predictions",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("arm", sa.String(16), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("label", sa.String(256), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("agrees", sa.Boolean),
    # Every class's probability, float16 in the version's label order (encode_probs): 2 bytes a class.
    sa.Column("probs", sa.LargeBinary),
    # A batch retried after an ambiguous commit must not add its rows twice (inserts skip conflicts).
    sa.UniqueConstraint("request_id", "arm", name="uq_champion_predictions_request_arm"),
)
feedback = sa.Table(
    "champion_feedback",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("label", sa.String(256), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("actor", sa.String(256), nullable=False),
)
_LENGTHS = {"request_id": 64, "model_name": 256, "model_version": 32, "arm": 16, "label": 256, "text": None}
_COLUMNS = [c.name for c in predictions.columns if c.name != "id"]


@dataclass(frozen=True)
class PredictionRecord:
    """One prediction as served; validated on creation so a bad record fails at the caller, not the writer."""

    request_id: str
    at: datetime
    model_name: str
    model_version: str
    arm: str
    text: str
    label: str
    score: float
    latency_ms: float
    agrees: bool | None = None
    probs: bytes | None = None  # encode_probs(row): the full probability vector, for monitoring

    def __post_init__(self) -> None:
        for name, limit in _LENGTHS.items():
            _check_text(f"PredictionRecord.{name}", getattr(self, name), limit)
        if self.arm not in ARMS:
            raise ValueError(f"PredictionRecord.arm must be one of {', '.join(ARMS)}; got {self.arm!r}.")
        _check_aware(self.at, "PredictionRecord.at")
        # numpy scalars straight from the model cannot be adapted by psycopg2 and would stall the writer.
        for name in ("score", "latency_ms"):
            try:
                object.__setattr__(self, name, float(getattr(self, name)))
            except (TypeError, ValueError):
                raise TypeError(
                    f"PredictionRecord.{name} must be a number; got {getattr(self, name)!r}."
                ) from None
        if self.agrees is not None:
            object.__setattr__(self, "agrees", bool(self.agrees))
        if self.probs is not None and not isinstance(self.probs, bytes):
            raise TypeError(f"PredictionRecord.probs must be bytes from encode_probs(); got {self.probs!r}.")


def encode_probs(row) -> bytes:
    """A probability vector as float16 bytes: the full vector at 2 bytes a class (154 B for 77 classes).

    float16 keeps about three significant digits, plenty for confidence, entropy and calibration; JSON text
    of the same vector would be about five times larger on every logged row.
    """
    import numpy as np

    return np.asarray(row, dtype="<f2").tobytes()


def decode_probs(blob: bytes | None):
    """The float32 vector encode_probs() stored, or None for rows logged without one."""
    import numpy as np

    return None if blob is None else np.frombuffer(blob, dtype="<f2").astype(np.float32)


class UnknownRequestError(ChampionError, ValueError):
    """Feedback named a request_id the inference log does not hold."""


class InferenceLog:
    """The store of predictions and feedback; inject a URL to switch sqlite for PostgreSQL."""

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = 10_000,
        batch_size: int = 256,
        flush_seconds: float = 0.5,
        retention_days: float | None = 30.0,
    ):
        backend = sa.engine.make_url(url).get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"The inference log needs a sqlite or PostgreSQL URL; got a {backend!r} one.")
        if queue_size < 1 or batch_size < 1:
            raise ValueError(f"queue_size ({queue_size}) and batch_size ({batch_size}) must be at least 1.")
        self.url = url
        self.queue_size, self.batch_size, self.flush_seconds = queue_size, batch_size, flush_seconds
        self.retention_days = retention_days
        # A batch larger than the queue never fills: appenders are waiting on the writer by then.
        self._full_batch = min(batch_size, queue_size)
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        if backend == "sqlite":
            self._prepare_sqlite()
        self._create_tables()

        # One re-entrant lock: a signal handler that calls close() may interrupt append on the same thread.
        self._lock = threading.RLock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        self._queue: deque[PredictionRecord] = deque()
        self._appended = 0
        # One counter per updating thread, so neither needs the lock to count what it committed.
        self._written_by_writer = 0
        self._written_by_close = 0
        self._flushing = 0
        self._busy = False  # the writer holds a batch or is applying retention
        self._closed = False
        self._closer: int | None = None
        self._finished = threading.Event()
        self._abandoned = threading.Event()
        self._thread: threading.Thread | None = None

    # --- setup ----------------------------------------------------------------------------------------

    def _prepare_sqlite(self) -> None:
        database = self.engine.url.database
        if database in (None, "", ":memory:"):
            raise ValueError(
                "The inference log needs a sqlite file (sqlite:///path/inference.db), not memory."
            )
        self._sqlite_path = Path(database)
        self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)

        @sa.event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")  # workers wait for each other
            cursor.close()

    def _create_tables(self) -> None:
        # Several server workers start at once; checking and creating the tables must not interleave.
        if self.engine.dialect.name == "sqlite":
            with open(self._sqlite_path.with_suffix(".lock"), "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    with self.engine.begin() as conn:
                        _metadata.create_all(conn, checkfirst=True)
                        _add_missing_columns(conn)
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
            return
        key = int.from_bytes(hashlib.sha256(b"champion:inference-log").digest()[:8], "big", signed=True)
        with self.engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            _metadata.create_all(conn, checkfirst=True)
            _add_missing_columns(conn)

    def start(self) -> InferenceLog:
        """Start the writer thread (once); `close` is also registered to run at interpreter exit."""
        with self._lock:
            if self._closed:
                raise RuntimeError("This inference log is closed; create a new InferenceLog to log again.")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="champion-inference-log", daemon=True)
                self._thread.start()
                atexit.register(self.close)
        return self

    # --- the request path -----------------------------------------------------------------------------

    def append(self, records: Sequence[PredictionRecord], timeout: float | None = None) -> None:
        """Queue records for the writer, waiting while the queue is full; TimeoutError after `timeout` s."""
        records = list(records)
        for record in records:  # anything else would stall the writer, which retries a batch until it commits
            if not isinstance(record, PredictionRecord):
                raise TypeError(f"append() takes PredictionRecord objects; got a {type(record).__name__}.")
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        with self._lock:
            while done < len(records):
                if self._closed:
                    raise RuntimeError("This inference log is closed; predictions can no longer be appended.")
                free = self.queue_size - len(self._queue)
                if free <= 0:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(
                            f"The inference log queue stayed full ({self.queue_size} records) for "
                            f"{timeout} s, so {len(records) - done} of {len(records)} records were not "
                            "appended; check that the writer is started and the database is reachable."
                        )
                    self._not_full.wait(remaining)
                    continue
                chunk = records[done : done + free]
                self._queue.extend(chunk)
                self._appended += len(chunk)
                done += len(chunk)
                if len(self._queue) == len(chunk) or len(self._queue) >= self._full_batch:
                    self._not_empty.notify()

    def flush(self, timeout: float | None = 30.0) -> None:
        """Return once every record appended before this call is committed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._appended
            if self.written >= target:
                return
            if self._thread is None and not self._closed:
                raise RuntimeError("InferenceLog.flush() needs the writer thread; call start() first.")
            self._flushing += 1
            self._not_empty.notify()  # the writer stops waiting for a full batch
            try:
                while self.written < target:
                    if self._finished.is_set():
                        raise RuntimeError(
                            f"The inference log was closed with {self.pending} predictions left unwritten."
                        )
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(
                            f"{target - self.written} predictions were still unwritten after {timeout} s; "
                            "check that the inference log database is reachable."
                        )
                    self._progress.wait(remaining)
            finally:
                self._flushing -= 1

    def close(self, timeout: float = 30.0) -> int:
        """Write what is queued and stop the writer; returns how many records could not be written."""
        deadline = time.monotonic() + timeout
        with self._lock:
            first = not self._closed
            if first:
                self._closed, self._closer = True, threading.get_ident()
                queued = list(self._queue)
                self._queue.clear()
                for condition in (self._not_empty, self._not_full, self._progress):
                    condition.notify_all()
        if not first:
            if self._closer != threading.get_ident():  # on the closing thread itself, waiting would deadlock
                self._finished.wait(timeout)
            return self.pending
        # Written here, not by the writer: when a signal handler interrupted append on this thread, the
        # lock stays held until the handler returns and the writer could never take the queue.
        for start in range(0, len(queued), self.batch_size):
            batch = queued[start : start + self.batch_size]
            if not self._insert_until(batch, deadline):
                break
            self._written_by_close += len(batch)
        # Polled rather than joined, for the same reason: the writer may be waiting for the lock.
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.01)
        self._abandoned.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        atexit.unregister(self.close)
        self.engine.dispose()
        self._finished.set()
        with self._lock:
            self._progress.notify_all()
        lost = self.pending
        if lost:
            logger.error("The inference log closed with %d predictions that could not be written.", lost)
        return lost

    @property
    def written(self) -> int:
        """Records committed so far."""
        return self._written_by_writer + self._written_by_close

    @property
    def pending(self) -> int:
        """Records appended but not yet committed."""
        return max(0, self._appended - self.written)

    # --- the writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        next_retention = time.monotonic()
        while True:
            if time.monotonic() >= next_retention:
                self._retain()
                next_retention = time.monotonic() + _RETENTION_EVERY_S
            batch = self._take(until=next_retention)
            if batch is None:
                return
            if not batch:
                continue
            if self._insert_until(batch, deadline=None):
                self._written_by_writer += len(batch)
            self._busy = False
            with self._lock:
                self._progress.notify_all()

    def _take(self, until: float) -> list[PredictionRecord] | None:
        """The next batch; [] when it is time for retention instead; None once closed."""
        with self._lock:
            while not self._queue:
                if self._closed:
                    return None
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return []
                self._not_empty.wait(remaining)
            fill_by = time.monotonic() + self.flush_seconds
            while len(self._queue) < self._full_batch and not self._flushing and not self._closed:
                remaining = fill_by - time.monotonic()
                if remaining <= 0:
                    break
                self._not_empty.wait(remaining)
            if not self._queue:  # close() took it
                return None
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            self._busy = True
            self._not_full.notify_all()
            return batch

    def _insert_until(self, batch: list[PredictionRecord], deadline: float | None) -> bool:
        """Insert one batch, retrying with backoff until it commits, `deadline` passes or close gives up."""
        backoff = _BACKOFF_FIRST_S
        while True:
            try:
                self._insert(batch)
                return True
            except Exception as err:  # whatever failed, the records stay in hand and are retried
                wait = backoff if deadline is None else min(backoff, deadline - time.monotonic())
                if wait <= 0 or self._abandoned.is_set():
                    logger.error("Giving up on writing %d predictions: %s", len(batch), _first_line(err))
                    return False
                logger.warning(
                    "Could not write %d predictions to the inference log (%s); retrying in %.1f s.",
                    len(batch),
                    _first_line(err),
                    wait,
                )
                if self._abandoned.wait(wait):
                    return False
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _insert(self, batch: list[PredictionRecord]) -> None:
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        rows = [{**vars(r), "at": r.at.astimezone(UTC)} for r in batch]  # sqlite stores the wall time only
        with self.engine.begin() as conn:
            conn.execute(
                insert(predictions).on_conflict_do_nothing(index_elements=["request_id", "arm"]), rows
            )

    def _retain(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._busy = True
        try:
            if deleted := self.apply_retention():
                logger.info(
                    "Retention deleted %d predictions older than %s days.", deleted, self.retention_days
                )
        except Exception as err:  # retention can wait for the next hour; writing predictions cannot
            logger.warning("Inference log retention failed (%s); trying again in an hour.", _first_line(err))
        finally:
            self._busy = False

    # --- feedback, retention, reading -----------------------------------------------------------------

    def add_feedback(self, request_id: str, label: str, actor: str | None = None) -> None:
        """Record the true label of a logged prediction; repeated feedback is kept and the latest wins."""
        _check_text("request_id", request_id, 64)
        _check_text("label", label, 256)
        row = {
            "request_id": request_id,
            "label": label,
            "at": datetime.now(UTC),
            "actor": actor or current_actor(),
        }
        _check_text("actor", row["actor"], 256)
        if self._insert_feedback(row):
            return
        self.flush()  # the prediction may still be queued
        if not self._insert_feedback(row):
            raise UnknownRequestError(
                f"No prediction with request_id {request_id!r} is in the inference log; send feedback with a "
                f"request_id the server returned, within the retention period ({self.retention_days} days)."
            )

    def _insert_feedback(self, row: dict) -> bool:
        with self.engine.begin() as conn:
            known = conn.execute(
                sa.select(predictions.c.id).where(predictions.c.request_id == row["request_id"]).limit(1)
            ).first()
            if known is not None:
                conn.execute(feedback.insert(), row)
        return known is not None

    def apply_retention(self, now: datetime | None = None) -> int:
        """Delete predictions older than `retention_days` and their feedback; returns predictions deleted."""
        if self.retention_days is None:
            return 0
        now = datetime.now(UTC) if now is None else _check_aware(now, "now")
        cutoff = now.astimezone(UTC) - timedelta(days=self.retention_days)
        with self.engine.begin() as conn:
            deleted = conn.execute(predictions.delete().where(predictions.c.at < cutoff)).rowcount
            if deleted:
                orphaned = ~sa.exists().where(predictions.c.request_id == feedback.c.request_id)
                conn.execute(feedback.delete().where(orphaned))
        return deleted

    def read(
        self,
        model_name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        arms: Sequence[str] | None = None,
        with_feedback: bool = True,
        labelled_only: bool = False,
    ) -> pandas.DataFrame:
        """Logged predictions in time order (`since` <= at < `until`), with `true_label` from feedback;
        `labelled_only`: just those that have one (filtered in the database, not after reading them all)."""
        import pandas as pd

        p = predictions.c
        columns = [p[name] for name in _COLUMNS]
        if with_feedback:
            latest = (
                sa.select(feedback.c.label)
                .where(feedback.c.request_id == p.request_id)
                .order_by(feedback.c.id.desc())
                .limit(1)
                .scalar_subquery()
            )
            columns.append(latest.label("true_label"))
        query = sa.select(*columns).order_by(p.at, p.id)
        if labelled_only:
            query = query.where(sa.exists().where(feedback.c.request_id == p.request_id))
        if model_name is not None:
            query = query.where(p.model_name == model_name)
        if since is not None:
            query = query.where(p.at >= _check_aware(since, "since").astimezone(UTC))
        if until is not None:
            query = query.where(p.at < _check_aware(until, "until").astimezone(UTC))
        if arms is not None:
            query = query.where(p.arm.in_([arms] if isinstance(arms, str) else list(arms)))
        with self.engine.connect() as conn:
            result = conn.execute(query)
            frame = pd.DataFrame(result.all(), columns=list(result.keys()))
        frame["at"] = pd.to_datetime(frame["at"], utc=True)  # sqlite hands back naive UTC
        return frame


def _add_missing_columns(conn: sa.Connection) -> None:
    """A log written by an older Champion lacks the newer nullable columns: add them in place."""
    have = {c["name"] for c in sa.inspect(conn).get_columns(predictions.name)}
    for column in predictions.columns:
        if column.name not in have:
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f'ALTER TABLE {predictions.name} ADD COLUMN "{column.name}" {kind}'))


def _check_text(name: str, value: object, limit: int | None) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string; got {type(value).__name__}.")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{name} is {len(value)} characters long; the inference log keeps at most {limit}.")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character, which PostgreSQL cannot store; remove it first.")


def _check_aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, e.g. datetime.now(UTC); got {value}.")
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
