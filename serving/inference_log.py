"""The inference log: every prediction, and the true labels that arrive later, in sqlite or PostgreSQL.

`append` writes records to a local spool file and returns: the request path never waits on the database,
and a record survives `kill -9` of the process once `append` returned. One writer thread ships the spool
to the database in batches, retrying with backoff while it is down, and whatever a killed process left is
written by the next log started on the same spool folder. Nothing is dropped: when the spool reaches its
bound (the database has been down for long), `append` refuses with SpoolFullError and the service
answers 503. Monitoring reads the log back with `read`, one row per prediction with its latest label.

A text-generation answer is a row too: `text` holds the conversation (the messages as JSON), `output` the
answer, `label` its finish reason (stop, length, cancelled: the client left, error), `score` the mean
log-probability of its tokens, with token counts, time to first token and tokens/s; its feedback is a
`rating` (-1, 0 or 1) and/or a `correction` (the answer it should have given).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from champion.audit import current_actor
from champion.db import create_tables, engine_for
from champion.errors import ChampionError
from serving.spool import Spool, SpoolWriteError
from serving.traffic import CanaryStats

if TYPE_CHECKING:
    import pandas

logger = logging.getLogger(__name__)

ARMS = ("champion", "challenger", "canary", "shadow")
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
    # text-generation answers only (see the module's docstring)
    sa.Column("output", sa.Text),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
    sa.Column("ttft_ms", sa.Float),
    sa.Column("tokens_per_s", sa.Float),
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
    sa.Column("rating", sa.Integer),  # text-generation: -1 bad, 0 neutral, 1 good
    sa.Column("correction", sa.Text),  # text-generation: the answer it should have given
)
# Each server worker's running canary counts for one (champion, challenger) pair, written by the worker
# (its cumulative totals, so a retried write never counts twice) and summed by every worker to judge the
# canary's guardrails on all the traffic, not on one worker's share. `epoch` is the audit event that made
# the version challenger: the same pair canaried again later starts from zero.
canary_tallies = sa.Table(
    "champion_canary_tallies",
    _metadata,
    sa.Column("model_name", sa.String(256), primary_key=True),
    sa.Column("champion", sa.String(32), primary_key=True),
    sa.Column("challenger", sa.String(32), primary_key=True),
    sa.Column("epoch", sa.Integer, primary_key=True),
    sa.Column("worker", sa.String(128), primary_key=True),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("errors", sa.Integer, nullable=False),
    sa.Column("agreements", sa.Integer, nullable=False),
    sa.Column("latency_buckets", sa.Text, nullable=False),  # JSON {bucket: count}, serving/traffic.py
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("clients", sa.Text),  # JSON {"since": time, "clients": {client hash: [answers, errors, agree]}}
)
_LENGTHS = {"request_id": 64, "model_name": 256, "model_version": 32, "arm": 16, "label": 256, "text": None}
_COLUMNS = [c.name for c in predictions.columns if c.name != "id"]
_GENERATION = ("output", "prompt_tokens", "completion_tokens", "ttft_ms", "tokens_per_s")
_GENERATION_NUMBERS = _GENERATION[1:]


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
    output: str | None = None  # a generated answer; the fields below too (text-generation only)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    tokens_per_s: float | None = None

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
        if self.output is not None:
            _check_text("PredictionRecord.output", self.output, None)
        for name in _GENERATION_NUMBERS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"PredictionRecord.{name} must be a number or None; got {value!r}.")
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


class SpoolFullError(ChampionError):
    """The spool holds `max_spool_bytes` of predictions the database has not taken: refuse, do not drop."""


class LogWriteError(SpoolFullError):
    """The spool's disk refused a batch (full, quota, size limit): not logged, so not answered."""


class LogClosedError(ChampionError, RuntimeError):
    """append() after close(): the server is shutting down."""


class LogUnavailableError(ChampionError):
    """The inference log database cannot be reached now (feedback and reads need it; predictions do not)."""


class InferenceLog:
    """The store of predictions and feedback; inject a URL to switch sqlite for PostgreSQL.

    `append` writes a batch to a local spool (serving/spool.py) and returns: one write, no database, no
    fsync, and the records survive a kill of the process. One writer thread ships the spool to the database
    in batches, retrying with backoff while it is down, and trims what committed. On start, and every
    `adopt_seconds`, it also ships what dead processes left in the same spool folder; the (request_id, arm)
    key makes that idempotent.
    """

    def __init__(
        self,
        url: str,
        *,
        spool_dir: str | os.PathLike[str] | None = None,
        max_spool_bytes: int = 1 << 30,
        batch_size: int = 256,
        flush_seconds: float = 0.5,
        retention_days: float | None = 30.0,
        adopt_seconds: float = 10.0,
    ):
        backend = sa.engine.make_url(url).get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"The inference log needs a sqlite or PostgreSQL URL; got a {backend!r} one.")
        if max_spool_bytes < 1 or batch_size < 1:
            raise ValueError(
                f"max_spool_bytes ({max_spool_bytes}) and batch_size ({batch_size}) must be at least 1."
            )
        self.url = url
        self.max_spool_bytes, self.batch_size, self.flush_seconds = max_spool_bytes, batch_size, flush_seconds
        self.retention_days, self.adopt_seconds = retention_days, adopt_seconds
        if backend == "sqlite" and sa.engine.make_url(url).database in (None, "", ":memory:"):
            raise ValueError(
                "The inference log needs a sqlite file (sqlite:///path/inference.db), not memory."
            )
        self.engine = engine_for(url)
        self.spool = Spool(spool_dir or default_spool_dir(url))
        self._tables_ready = False
        try:  # a database that is down at start must not stop a server from answering
            self._ensure_tables()
        except sa.exc.OperationalError as err:
            logger.warning("The inference log database is not reachable yet (%s).", _first_line(err))

        # One re-entrant lock: a signal handler that calls close() may interrupt append on the same thread.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        # Held by whoever ships (the writer, or close() at the end), never while waiting on the lock above.
        self._ship_lock = threading.Lock()
        self._appended = 0
        self._first_unwritten_at: float | None = None  # monotonic time of the oldest unwritten append
        self._written = 0
        self._adopted = 0
        self._flushing = 0
        self._down_since: float | None = None
        self._writer_error: str | None = None  # the writer's last failure, until a batch ships again
        self._writer_died: str | None = None
        self._closed = False
        self._finished = threading.Event()
        self._abandoned = threading.Event()
        self._thread: threading.Thread | None = None

    # --- setup ----------------------------------------------------------------------------------------

    def _ensure_tables(self) -> None:
        if self._tables_ready:
            return
        create_tables(self.engine, _metadata, upgrade=_add_missing_columns)  # workers start at once
        self._tables_ready = True

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

    def append(self, records: Sequence[PredictionRecord]) -> None:
        """Put records in the spool (one write); once this returns they survive a kill of the process.

        Raises SpoolFullError, writing nothing, when the spool already holds `max_spool_bytes` that the
        database has not taken (it has been down for long), or LogWriteError (a SpoolFullError) when the
        spool's disk refuses the write: the caller should refuse the request.
        """
        records = list(records)
        for record in records:  # anything else would stall the writer, which retries a batch until it commits
            if not isinstance(record, PredictionRecord):
                raise TypeError(f"append() takes PredictionRecord objects; got a {type(record).__name__}.")
        if not records:
            return
        data = b"".join(_encode(r) for r in records)
        with self._lock:
            if self._closed:
                raise LogClosedError("the inference log is closed (the server is stopping); send it again.")
            if self.spool.unshipped_bytes + len(data) > self.max_spool_bytes:
                raise SpoolFullError(
                    f"the inference log spool at {self.spool.folder} holds {self.spool.unshipped_bytes:,} "
                    f"bytes the database has not taken (limit {self.max_spool_bytes:,}); predictions are "
                    "refused until the inference log database is back."
                )
            try:
                self.spool.append(data)
            except SpoolWriteError as err:
                raise LogWriteError(
                    f"the inference log spool at {self.spool.folder} cannot be written ({err.strerror}); "
                    "predictions are refused until there is room on its disk: none goes unlogged."
                ) from None
            if self._appended == self._written:
                self._first_unwritten_at = time.monotonic()
            self._appended += len(records)
            if self._appended - self._written in (len(records), self.batch_size):
                self._wake.notify()

    def flush(self, timeout: float | None = 30.0) -> None:
        """Return once every record appended before this call is committed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._appended
            if self._written >= target:
                return
            if self._thread is None and not self._closed:
                raise RuntimeError("InferenceLog.flush() needs the writer thread; call start() first.")
            self._flushing += 1
            self._wake.notify()  # the writer stops waiting for a full batch
            try:
                while self._written < target:
                    if self._finished.is_set():
                        raise LogUnavailableError(
                            f"the inference log was closed with {self.pending} predictions not yet written "
                            f"to the database; they are kept in {self.spool.folder} for the next start."
                        )
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise LogUnavailableError(
                            f"{target - self._written} predictions were still not in the inference log "
                            f"database after {timeout} s; check that it is reachable (they are kept in "
                            f"{self.spool.folder} meanwhile)."
                        )
                    self._progress.wait(remaining)
            finally:
                self._flushing -= 1

    def close(self, timeout: float = 30.0) -> int:
        """Write what is spooled and stop the writer; returns how many records stay in the spool unwritten.

        Those are not lost: the next InferenceLog started on the same spool folder writes them.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            first = not self._closed
            self._closed = True
            for condition in (self._wake, self._progress):
                condition.notify_all()
        if not first:
            self._finished.wait(timeout)
            return self.pending
        # Shipped here, not left to the writer: when a signal handler interrupted append on this thread,
        # the lock stays held until the handler returns, and the writer could never take the last batch.
        if self._ship_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            try:
                while self._ship_batch(deadline):
                    pass
            except Exception as err:  # what is left stays spooled for the next start
                logger.error("Could not write the last spooled predictions (%s).", _first_line(err))
            finally:
                self._abandoned.set()
                self._ship_lock.release()
        self._abandoned.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        atexit.unregister(self.close)
        left = self.pending
        self.spool.close()
        self.engine.dispose()
        self._finished.set()
        with self._lock:
            self._progress.notify_all()
        if left:
            logger.error(
                "The inference log closed with %d predictions not yet in the database; they stay in %s "
                "and are written by the next server started on it.",
                left,
                self.spool.folder,
            )
        return left

    @property
    def spool_full(self) -> bool:
        """The spool holds `max_spool_bytes` the database has not taken: appends are refused."""
        return self.spool.unshipped_bytes >= self.max_spool_bytes

    @property
    def written(self) -> int:
        """Records this log appended that are committed to the database."""
        return self._written

    @property
    def pending(self) -> int:
        """Records appended but not yet committed."""
        return max(0, self._appended - self._written)

    @property
    def adopted(self) -> int:
        """Records left by dead processes in the spool folder that this log wrote for them."""
        return self._adopted

    def behind_seconds(self) -> float:
        """How long the oldest record not yet in the database has waited; 0 when none waits."""
        started = self._first_unwritten_at
        return 0.0 if started is None or not self.pending else time.monotonic() - started

    # --- the writer thread ----------------------------------------------------------------------------

    @property
    def writer_alive(self) -> bool:
        """False once the writer thread has died: what is appended then waits for the next server."""
        return self._writer_died is None

    @property
    def writer_problem(self) -> str | None:
        """Why the writer is not shipping (a failure it retries, or its death); None when all is well."""
        if self._writer_died is not None:
            return (
                f"the inference log writer stopped ({self._writer_died}); predictions stay in "
                f"{self.spool.folder} until the server is restarted."
            )
        if self._writer_error is not None:
            return f"the inference log writer is retrying after: {self._writer_error}"
        return None

    def _run(self) -> None:
        from serving.metrics import metrics

        try:
            self._write_until_closed()
        except BaseException as err:  # nothing should get here; if it does, health and /metrics say so
            self._writer_died = _first_line(err)
            metrics().log_writer_up.set(0)
            logger.critical("The inference log writer thread died: %s", self._writer_died, exc_info=True)
            raise

    def _write_until_closed(self) -> None:
        from serving.metrics import metrics

        m = metrics()
        m.log_writer_up.set(1)
        next_retention = next_adoption = time.monotonic()
        backoff = _BACKOFF_FIRST_S
        while True:
            try:
                now = time.monotonic()
                if now >= next_retention:
                    self._retain()
                    next_retention = time.monotonic() + _RETENTION_EVERY_S
                if now >= next_adoption:
                    self._adopt()
                    next_adoption = time.monotonic() + self.adopt_seconds
                if not self._wait_for_batch(until=min(next_retention, next_adoption)):
                    return
                with self._ship_lock:
                    if self._abandoned.is_set():
                        return
                    self._ship_batch(deadline=None)
                with self._lock:
                    self._progress.notify_all()
            except Exception as err:  # e.g. the disk is full for rejected.jsonl: the lines stay spooled
                self._writer_error = _first_line(err)
                m.log_writer_errors.inc()
                logger.exception("The inference log writer failed; retrying in %.1f s.", backoff)
                if self._abandoned.wait(backoff):
                    return
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            backoff = _BACKOFF_FIRST_S

    def _wait_for_batch(self, until: float) -> bool:
        """Wait until a batch is worth shipping (full, old enough, flushed) or `until`; False once closed."""
        with self._lock:
            while not self.pending:
                if self._closed:
                    return False
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return True
                self._wake.wait(remaining)
            fill_by = time.monotonic() + self.flush_seconds
            while self.pending < self.batch_size and not self._flushing and not self._closed:
                remaining = min(fill_by, until) - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)
            return not self._closed or self.pending > 0

    def _ship_batch(self, deadline: float | None) -> bool:
        """Write the next spooled batch to the database (the caller holds the ship lock); False when none."""
        lines, position = self.spool.read(self.batch_size)
        if not lines:
            return False
        records = _decode_lines(lines, self.spool.folder)
        if not self._insert_until(records, deadline):
            return False
        self.spool.shipped(position, sum(map(len, lines)))
        self._writer_error = None
        self._written += len(records)
        if not self.pending:
            self._first_unwritten_at = None
        return True

    def _adopt(self) -> None:
        """Write what killed processes left in the spool folder (their flock is free)."""
        try:
            with self._ship_lock:
                adopted = self.spool.adopt_orphans(self._ship_lines, self.batch_size)
        except _Abandoned:
            return
        except Exception as err:  # the database is down: what they left waits for the next round
            logger.warning("Could not yet write predictions left in the spool (%s).", _first_line(err))
            return
        if adopted:
            self._adopted += adopted
            logger.warning(
                "Wrote %d predictions that a stopped server had left in %s.", adopted, self.spool.folder
            )

    def _ship_lines(self, lines: list[bytes]) -> None:
        records = _decode_lines(lines, self.spool.folder)
        if not self._insert_until(records, deadline=None):
            raise _Abandoned()

    def _insert_until(self, batch: list[PredictionRecord], deadline: float | None) -> bool:
        """Insert one batch, retrying with backoff until it commits, `deadline` passes or close gives up."""
        backoff = _BACKOFF_FIRST_S
        while True:
            try:
                self._ensure_tables()
                self._insert(batch)
            except Exception as err:  # whatever failed, the records stay in the spool and are retried
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    logger.error(
                        "The inference log database is not taking writes (%s); predictions are kept in %s "
                        "and written when it is back.",
                        _first_line(err),
                        self.spool.folder,
                    )
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
                continue
            if self._down_since is not None:
                logger.warning(
                    "The inference log database is back after %.0f s; writing what was spooled.",
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
            return True

    @property
    def database_up(self) -> bool:
        """False from a failed write until the next one that commits."""
        return self._down_since is None

    def _insert(self, batch: list[PredictionRecord]) -> None:
        if not batch:
            return
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
        if self._closed:
            return
        try:
            self._ensure_tables()
            if deleted := self.apply_retention():
                logger.info(
                    "Retention deleted %d predictions older than %s days.", deleted, self.retention_days
                )
        except Exception as err:  # retention can wait for the next hour; writing predictions cannot
            logger.warning("Inference log retention failed (%s); trying again in an hour.", _first_line(err))

    # --- feedback, retention, reading -----------------------------------------------------------------

    def add_feedback(
        self,
        request_id: str,
        label: str,
        actor: str | None = None,
        rating: int | None = None,
        correction: str | None = None,
    ) -> None:
        """Record the true label of a logged prediction (for a generated answer: a rating and/or the corrected
        answer, with label ""); repeated feedback is kept and the latest wins."""
        _check_text("request_id", request_id, 64)
        _check_text("label", label, 256)
        if rating is not None and (isinstance(rating, bool) or rating not in (-1, 0, 1)):
            raise ValueError(f"rating must be -1, 0 or 1; got {rating!r}.")
        if correction is not None:
            _check_text("correction", correction, None)
        row = {
            "request_id": request_id,
            "label": label,
            "at": datetime.now(UTC),
            "actor": actor or current_actor(),
            "rating": rating,
            "correction": correction,
        }
        _check_text("actor", row["actor"], 256)
        if self._insert_feedback(row):
            return
        self.flush(timeout=10.0)  # the prediction may still be in the spool
        if not self._insert_feedback(row):
            raise UnknownRequestError(
                f"No prediction with request_id {request_id!r} is in the inference log; send feedback with a "
                f"request_id the server returned, within the retention period ({self.retention_days} days)."
            )

    def _insert_feedback(self, row: dict) -> bool:
        try:
            self._ensure_tables()
            with self.engine.begin() as conn:
                known = conn.execute(
                    sa.select(predictions.c.id).where(predictions.c.request_id == row["request_id"]).limit(1)
                ).first()
                if known is not None:
                    conn.execute(feedback.insert(), row)
        except sa.exc.OperationalError as err:
            raise LogUnavailableError(
                f"the inference log database is not reachable ({_first_line(err)}); send the feedback again "
                "once it is back."
            ) from None
        return known is not None

    # --- the canary's tallies, shared by all workers ---------------------------------------------------

    def publish_canary(self, model_name: str, epoch: int, worker: str, stats: CanaryStats) -> None:
        """Write one worker's cumulative canary stats for a pair (an upsert: repeating it is harmless)."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        counts = {
            "requests": stats.requests,
            "errors": stats.errors,
            "agreements": stats.agreements,
            "latency_buckets": json.dumps({str(k): v for k, v in sorted(stats.latency_buckets.items())}),
            "updated_at": datetime.now(UTC),
            "clients": json.dumps({"since": stats.since, "clients": stats.clients}),
        }
        key = {"model_name": model_name, "champion": stats.champion, "challenger": stats.challenger,
               "epoch": epoch, "worker": worker}  # fmt: skip
        self._ensure_tables()
        with self.engine.begin() as conn:
            conn.execute(
                insert(canary_tallies)
                .values(**key, **counts)
                .on_conflict_do_update(index_elements=list(key), set_=counts)
            )

    def read_canary(self, model_name: str, champion: str, challenger: str, epoch: int) -> list[CanaryStats]:
        """Every worker's stats for one canary: the pair, since the audit event `epoch`."""
        c = canary_tallies.c
        query = sa.select(c.requests, c.errors, c.agreements, c.latency_buckets, c.clients).where(
            c.model_name == model_name, c.champion == champion, c.challenger == challenger, c.epoch == epoch
        )
        self._ensure_tables()
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        found = []
        for r in rows:
            buckets = {int(k): v for k, v in json.loads(r.latency_buckets).items()}
            seen = json.loads(r.clients) if r.clients else {}  # none from an older worker: no client counted
            counts = (r.requests, r.errors, r.agreements, buckets)
            clients, since = seen.get("clients", {}), seen.get("since")
            found.append(CanaryStats(champion, challenger, *counts, clients=clients, since=since))
        return found

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
            conn.execute(canary_tallies.delete().where(canary_tallies.c.updated_at < cutoff))
        return deleted

    def read(
        self,
        model_name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        arms: Sequence[str] | None = None,
        with_feedback: bool = True,
        labelled_only: bool = False,
        generated: bool = False,
    ) -> pandas.DataFrame:
        """Logged predictions in time order (`since` <= at < `until`), with `true_label` from feedback;
        `labelled_only`: just those that have one (filtered in the database, not after reading them all);
        `generated`: also the columns of generated answers (output, token counts, time to first token,
        tokens/s) and the latest feedback's `rating` and `correction`."""
        import pandas as pd

        p = predictions.c
        columns = [p[name] for name in _COLUMNS if generated or name not in _GENERATION]
        self._ensure_tables()
        if with_feedback:
            latest = (
                sa.select(feedback.c.label)
                .where(feedback.c.request_id == p.request_id)
                .order_by(feedback.c.id.desc())
                .limit(1)
                .scalar_subquery()
            )
            columns.append(latest.label("true_label"))
        if generated:
            for name in ("rating", "correction"):
                newest = (
                    sa.select(feedback.c[name])
                    .where(feedback.c.request_id == p.request_id, feedback.c[name].is_not(None))
                    .order_by(feedback.c.id.desc())
                    .limit(1)
                    .scalar_subquery()
                )
                columns.append(newest.label(name))
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


class _Abandoned(Exception):
    """close() gave up while the writer was shipping what a dead process left."""


def default_spool_dir(url: str) -> Path:
    """Where a log on `url` spools: beside a sqlite file, else in the home, one folder per database."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return Path(parsed.database).with_suffix(".spool")
    from champion.config import champion_home

    key = hashlib.sha256(parsed.render_as_string(hide_password=True).encode()).hexdigest()[:12]
    return champion_home() / "spool" / f"{parsed.host or 'local'}-{parsed.database or 'db'}-{key}"


def _encode(r: PredictionRecord) -> bytes:
    """One spool line: a JSON array in the table's column order; probabilities as base64."""
    probs = None if r.probs is None else base64.b64encode(r.probs).decode("ascii")
    row = [r.request_id, r.at.isoformat(), r.model_name, r.model_version, r.arm, r.text, r.label,
           r.score, r.latency_ms, r.agrees, probs]  # fmt: skip
    if r.output is not None:  # a generated answer: its fields as a 12th item (older lines have 11)
        row.append({name: getattr(r, name) for name in _GENERATION})
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _decode(line: bytes) -> PredictionRecord:
    rid, at, model, version, arm, text, label, score, latency, agrees, probs, *rest = json.loads(line)
    generated = rest[0] if rest else {}
    return PredictionRecord(
        rid, datetime.fromisoformat(at), model, version, arm, text, label, score, latency, agrees,
        None if probs is None else base64.b64decode(probs), **{k: generated.get(k) for k in _GENERATION},
    )  # fmt: skip


def _decode_lines(lines: list[bytes], folder: Path) -> list[PredictionRecord]:
    """The records in `lines`; a line that is not one (edited by hand, disk damage) is set aside, not lost."""
    records = []
    for line in lines:
        try:
            records.append(_decode(line))
        except (ValueError, TypeError) as err:
            with open(folder / "rejected.jsonl", "ab") as fh:
                fh.write(line if line.endswith(b"\n") else line + b"\n")
            logger.error("A spooled line is not a prediction record (%s); set aside in rejected.jsonl.", err)
    return records


def _add_missing_columns(conn: sa.Connection) -> None:
    """A log written by an older Champion lacks the newer nullable columns: add them in place."""
    for table in (predictions, canary_tallies, feedback):
        have = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


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
