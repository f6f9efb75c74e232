"""The inference log on a real sqlite file and a real PostgreSQL: batching, backpressure, outages, exit."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from serving.inference_log import (
    InferenceLog,
    PredictionRecord,
    SpoolFullError,
    UnknownRequestError,
    feedback,
)

ROOT = Path(__file__).resolve().parents[1]


def _records(n: int, at: datetime | None = None, model: str = "intents", arm: str = "champion"):
    at = at or datetime.now(UTC)
    return [
        PredictionRecord(
            uuid.uuid4().hex, at, model, "3", arm, f"where is order {i}", "track_order", 0.9, 1.5
        )
        for i in range(n)
    ]


def _ids(records) -> set[str]:
    return {r.request_id for r in records}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, home) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{home / 'inference.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def open_log(url):
    """Open InferenceLogs on `url`; any still open are closed after the test."""
    logs = []

    def make(**settings) -> InferenceLog:
        logs.append(InferenceLog(url, **settings))
        return logs[-1]

    yield make
    for log in logs:
        log.close(timeout=5)


def test_concurrent_appends_are_all_written_exactly_once(open_log):
    log = open_log(batch_size=64, flush_seconds=0.05).start()
    per_thread = [_records(625) for _ in range(8)]

    def serve(records):
        for i in range(0, len(records), 5):
            log.append(records[i : i + 5])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(serve, per_thread))
    assert log.close() == 0
    assert log.pending == 0 and log.written == 5000
    frame = log.read()
    assert len(frame) == 5000 and frame["request_id"].is_unique
    assert set(frame["request_id"]) == set().union(*map(_ids, per_thread))
    assert frame["at"].is_monotonic_increasing


def test_a_full_spool_refuses_new_records_and_keeps_the_ones_it_holds(open_log):
    log = open_log(max_spool_bytes=6_000)  # writer not started: nothing leaves the spool
    records, held = _records(100), []
    with pytest.raises(SpoolFullError, match="refused until the inference log database is back"):
        for i in range(0, len(records), 4):
            log.append(records[i : i + 4])
            held += records[i : i + 4]
    assert 0 < len(held) < 100 and log.pending == len(held)  # a refused batch is not half-written
    with pytest.raises(RuntimeError, match=r"call start\(\) first"):
        log.flush()
    log.start()
    log.flush(timeout=10)
    log.append(records[len(held) : len(held) + 4])  # room again once the database took the rest
    assert log.close() == 0
    assert set(log.read()["request_id"]) == _ids(records[: len(held) + 4])


def test_flush_makes_appended_rows_readable_without_waiting_for_a_full_batch(open_log):
    log = open_log(batch_size=1000, flush_seconds=60).start()
    records = _records(10)
    log.append(records)
    assert log.read().empty and log.pending == 10  # the writer is still waiting for its batch to fill
    started = time.monotonic()
    log.flush(timeout=10)
    assert time.monotonic() - started < 5
    assert log.pending == 0 and log.written == 10
    assert set(log.read()["request_id"]) == _ids(records)


def test_read_filters_by_model_time_and_arm(open_log):
    t0 = datetime(2030, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    champion = _records(2, at=t0)
    canary = [replace(r, arm="canary", agrees=True) for r in _records(2, at=t0 + timedelta(minutes=1))]
    other = _records(1, at=t0 + timedelta(minutes=2), model="other")
    log = open_log(retention_days=None).start()
    log.append(other + canary + champion)
    log.flush()

    frame = log.read()
    assert list(frame.columns) == [
        *("request_id", "at", "model_name", "model_version", "arm", "text", "label", "score"),
        *("latency_ms", "agrees", "probs", "true_label"),
    ]
    assert set(frame["request_id"][:2]) == _ids(champion)
    assert str(frame["at"].dt.tz) == "UTC" and frame["at"].iloc[0] == t0  # microseconds survive
    assert frame["score"].iloc[0] == 0.9 and frame["true_label"].isna().all()
    assert list(log.read(arms=["canary"])["agrees"]) == [True, True]
    assert log.read(arms=["champion"])["agrees"].isna().all()
    assert set(log.read(model_name="other")["request_id"]) == _ids(other)
    window = log.read(since=t0 + timedelta(seconds=30), until=t0 + timedelta(minutes=2))
    assert set(window["request_id"]) == _ids(canary)  # since is inclusive, until exclusive
    assert "true_label" not in log.read(with_feedback=False).columns
    with pytest.raises(ValueError, match="since must be a timezone-aware datetime"):
        log.read(since=datetime(2030, 5, 1))


def test_feedback_reaches_queued_predictions_and_the_latest_label_wins(open_log, url):
    log = open_log(batch_size=1000, flush_seconds=60).start()
    (answer,) = _records(1)
    shadow = replace(answer, arm="shadow", label="card_declined", agrees=False)
    log.append([answer, shadow])
    log.add_feedback(answer.request_id, "reset_password")  # still queued: feedback flushes first
    log.add_feedback(answer.request_id, "invoice_request", actor="agent-7")
    with pytest.raises(UnknownRequestError, match="'never-served'") as err:
        log.add_feedback("never-served", "track_order")
    assert isinstance(err.value, ValueError)

    frame = log.read()
    assert list(frame["arm"]) == ["champion", "shadow"]
    assert list(frame["true_label"]) == ["invoice_request", "invoice_request"]
    other_process = open_log()  # feedback only, e.g. a labelling job: no writer needed
    other_process.add_feedback(answer.request_id, "track_order")
    assert set(log.read()["true_label"]) == {"track_order"}


def test_labelled_only_reads_just_the_predictions_with_feedback(open_log):
    log = open_log().start()
    records = _records(6)
    log.append(records)
    log.flush()
    for record in records[1::2]:
        log.add_feedback(record.request_id, "track_order")
    labelled = log.read(labelled_only=True)
    assert list(labelled["request_id"]) == [r.request_id for r in records[1::2]]
    assert set(labelled["true_label"]) == {"track_order"} and len(log.read()) == 6
    log.close()


def test_retention_deletes_old_predictions_and_their_feedback(open_log):
    now = datetime.now(UTC)
    old, new = _records(3, at=now - timedelta(days=10)), _records(2, at=now - timedelta(days=1))
    keep_all = open_log(retention_days=None).start()
    keep_all.append(old + new)
    keep_all.flush()
    for record in old + new:
        keep_all.add_feedback(record.request_id, "track_order")
    assert keep_all.apply_retention() == 0 and len(keep_all.read()) == 5
    keep_all.close()

    log = open_log(retention_days=7).start()  # retention also runs when the writer starts
    latest = _records(1)
    log.append(latest)
    log.flush()  # the writer applied retention before writing this batch
    assert set(log.read()["request_id"]) == _ids(new + latest)
    with log.engine.connect() as conn:
        kept = conn.execute(sa.select(feedback.c.request_id)).scalars().all()
    assert sorted(kept) == sorted(_ids(new))
    assert log.apply_retention(now=now + timedelta(days=30)) == 3
    assert log.read().empty


def test_a_batch_written_twice_adds_no_duplicate_rows(open_log):
    log = open_log(flush_seconds=0.01).start()
    records = _records(20)
    log.append(records)
    log.flush()
    log.append(records)  # a retry after a commit whose outcome was lost looks like this
    assert log.close() == 0
    frame = log.read()
    assert len(frame) == 20 and set(frame["request_id"]) == _ids(records)


def test_canary_tallies_are_upserted_per_worker_and_kept_apart_per_canary(open_log):
    from serving.traffic import CanaryStats, combined

    log = open_log()
    stats = {w: CanaryStats("1", "2") for w in ("a", "b")}
    stats["a"].add(10, 1, 8, 5.0)
    stats["b"].add(7, 0, 7, 50.0)
    for worker, s in stats.items():
        log.publish_canary("m", 11, worker, s)
    stats["a"].add(3, 0, 3, 5.0)
    log.publish_canary("m", 11, "a", stats["a"])  # cumulative: replaces a's row, adds nothing twice
    log.publish_canary("m", 12, "a", CanaryStats("1", "2", 99, 0, 99, {0: 99}))  # a later canary
    total = combined("1", "2", log.read_canary("m", "1", "2", 11))
    assert (total.workers, total.requests, total.errors, total.agreements) == (2, 20, 1, 18)
    assert total.latency_buckets == combined("1", "2", list(stats.values())).latency_buckets
    assert log.read_canary("m", "1", "3", 11) == [] and len(log.read_canary("m", "1", "2", 12)) == 1


def test_two_workers_create_the_tables_and_write_at_once(url):
    start_together = threading.Barrier(2)
    batches = [_records(1000), _records(1000)]

    def worker(records) -> int:
        start_together.wait()
        log = InferenceLog(url, batch_size=32, flush_seconds=0.02).start()
        for i in range(0, len(records), 10):
            log.append(records[i : i + 10])
        return log.close()

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(worker, batches)) == [0, 0]
    reader = InferenceLog(url)
    frame = reader.read()
    reader.close()
    assert len(frame) == 2000 and set(frame["request_id"]) == _ids(batches[0] + batches[1])


def test_close_is_idempotent_and_final(open_log):
    never_started = open_log()
    records = _records(3)
    never_started.append(records)
    assert never_started.close() == 0  # close writes what is queued even without the writer
    assert never_started.close() == 0
    with pytest.raises(RuntimeError, match="closed"):
        never_started.append(_records(1))
    with pytest.raises(RuntimeError, match="closed"):
        never_started.start()
    assert set(never_started.read()["request_id"]) == _ids(records)  # reading still works

    started = open_log().start()
    started.append(_records(2))
    assert started.close() == 0 and started.close() == 0 and started.written == 2


@pytest.mark.parametrize("outage", ["locked", "table_missing"])
def test_writer_outlasts_a_sqlite_outage(home, outage, caplog):
    caplog.set_level(logging.WARNING, logger="serving.inference_log")
    path = home / "inference.db"
    log = InferenceLog(f"sqlite:///{path}", batch_size=50, flush_seconds=0.02).start()
    before = _records(100)
    log.append(before)
    log.flush()

    other = sqlite3.connect(path, isolation_level=None)
    if outage == "locked":
        other.execute("BEGIN EXCLUSIVE")
    else:
        other.execute("ALTER TABLE champion_predictions RENAME TO champion_predictions_away")
    during = _records(100)
    log.append(during)
    time.sleep(1.0)
    assert log.pending == 100  # nothing written, nothing dropped
    if outage == "locked":
        other.execute("COMMIT")
    else:
        other.execute("ALTER TABLE champion_predictions_away RENAME TO champion_predictions")
        assert "retrying" in caplog.text
    other.close()

    assert log.close() == 0
    frame = log.read()
    assert len(frame) == 200 and set(frame["request_id"]) == _ids(before + during)


def test_close_reports_what_it_could_not_write(home, caplog):
    path = home / "inference.db"
    log = InferenceLog(f"sqlite:///{path}").start()
    with sqlite3.connect(path) as other:
        other.execute("ALTER TABLE champion_predictions RENAME TO champion_predictions_away")
    records = _records(7)
    log.append(records)
    assert log.close(timeout=0.5) == 7
    assert "closed with 7 predictions not yet in the database; they stay in" in caplog.text
    with sqlite3.connect(path) as other:
        other.execute("ALTER TABLE champion_predictions_away RENAME TO champion_predictions")
    nxt = InferenceLog(f"sqlite:///{path}").start()  # the next server on the same spool writes them
    deadline = time.monotonic() + 10
    while nxt.adopted < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nxt.close() == 0 and nxt.adopted == 7
    assert set(nxt.read()["request_id"]) == _ids(records)
    assert not list((home / "inference.spool").glob("*.jsonl"))  # shipped segments are trimmed


def test_a_second_close_waits_for_the_first(home):
    path = home / "inference.db"
    log = InferenceLog(f"sqlite:///{path}").start()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("ALTER TABLE champion_predictions RENAME TO champion_predictions_away")
    log.append(_records(5))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(log.close, 10)
        time.sleep(0.2)  # the first close is retrying the write
        second = pool.submit(log.close)  # e.g. atexit while a shutdown hook is still closing
        time.sleep(0.3)
        other.execute("ALTER TABLE champion_predictions_away RENAME TO champion_predictions")
        assert first.result() == 0 and second.result() == 0
    other.close()
    assert len(log.read()) == 5


@pytest.mark.postgres
def test_writer_outlasts_postgres_refusing_connections(pg_server, pg_url, caplog):
    import psycopg2

    caplog.set_level(logging.WARNING, logger="serving.inference_log")
    name = sa.engine.make_url(pg_url).database
    log = InferenceLog(pg_url, batch_size=50, flush_seconds=0.02).start()
    before = _records(100)
    log.append(before)
    log.flush()

    admin = psycopg2.connect(pg_server.admin_dsn(), connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        during = _records(100)
        log.append(during)
        time.sleep(1.0)
        assert log.pending == 100
        cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    admin.close()

    assert log.close() == 0
    assert "retrying" in caplog.text
    frame = log.read()
    assert len(frame) == 200 and set(frame["request_id"]) == _ids(before + during)


_CHILD = """
import json, signal, sys, time
from datetime import UTC, datetime
from serving.inference_log import InferenceLog, PredictionRecord

url, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = InferenceLog(url, batch_size=5000, flush_seconds=3600).start()

def stop(signum, frame):
    lost = log.close()
    print(json.dumps({"written": log.written, "lost": lost}), flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
record = lambda i: PredictionRecord(f"{i:032d}", datetime.now(UTC), "m", "1", "champion", "t", "l", 0.5, 1.0)
if mode == "idle":
    log.append([record(i) for i in range(n)])
    print("ready", flush=True)
    while True:
        time.sleep(1)
print("ready", flush=True)
i = 0
while True:  # the signal lands in the middle of append, with the log's lock held
    log.append([record(i)])
    i += 1
"""


@pytest.mark.parametrize("mode", ["idle", "appending"])
def test_sigterm_handler_that_closes_the_log_loses_nothing(home, mode):
    url = f"sqlite:///{home / 'inference.db'}"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, mode, "1234"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0
    report = json.loads(out)
    assert report["lost"] == 0
    reader = InferenceLog(url)
    ids = sorted(reader.read()["request_id"])
    reader.close()
    assert len(ids) == report["written"] and len(ids) > 0
    assert ids == [f"{i:032d}" for i in range(len(ids))]  # every appended record, in order, none twice
    if mode == "idle":
        assert len(ids) == 1234


_KILLED = """
import sys
from datetime import UTC, datetime
from serving.inference_log import InferenceLog, PredictionRecord

log = InferenceLog(sys.argv[1], batch_size=int(sys.argv[2]), flush_seconds=0.01).start()
record = lambda i: PredictionRecord(f"{i:032d}", datetime.now(UTC), "m", "1", "champion", "t", "l", 0.5, 1.0)
i = 0
while True:
    log.append([record(j) for j in range(i, i + 8)])
    i += 8
    print(i, flush=True)  # the batch is answered only now
"""


@pytest.mark.parametrize("batch", [64, 100_000])  # shipping as it goes, or never before the kill
def test_kill_9_while_appending_loses_no_appended_record(home, batch):
    url = f"sqlite:///{home / 'inference.db'}"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED, url, str(batch)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "8"
        time.sleep(1.0)
        child.kill()  # SIGKILL: no handler, no atexit, no flush
        answered = int(child.stdout.read().split()[-1])
    finally:
        child.kill()
        child.wait()
    log = InferenceLog(url, adopt_seconds=0.1).start()
    deadline = time.monotonic() + 30
    while list((home / "inference.spool").glob("*.lock")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the dead writer's files go once what it left is written
    assert log.adopted > 0 or batch < 100_000
    ids = list(log.read()["request_id"])
    assert log.close() == 0
    assert len(ids) == len(set(ids))  # none twice
    assert set(ids) >= {f"{i:032d}" for i in range(answered)}  # every answered one


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"at": datetime(2030, 1, 1)}, "at must be a timezone-aware datetime"),
        ({"arm": "blue"}, "arm must be one of champion, challenger, canary, shadow"),
        ({"label": "x" * 300}, "label is 300 characters long"),
        ({"text": "a\x00b"}, "text contains a NUL character"),
        ({"score": "high"}, "score must be a number"),
    ],
)
def test_a_bad_record_fails_where_it_is_made(change, message):
    (good,) = _records(1)
    with pytest.raises((TypeError, ValueError), match=message):
        replace(good, **change)


def test_numpy_scalars_from_the_model_are_stored_as_python_values():
    (record,) = _records(1)
    record = replace(record, score=np.float32(0.25), latency_ms=np.float64(3.0), agrees=np.bool_(True))
    assert type(record.score) is float and type(record.latency_ms) is float and record.agrees is True


def test_append_takes_only_prediction_records(home):
    log = InferenceLog(f"sqlite:///{home / 'inference.db'}")
    with pytest.raises(TypeError, match="takes PredictionRecord objects; got a dict"):
        log.append([{"request_id": "abc"}])
    assert log.pending == 0 and log.close() == 0


def test_only_sqlite_files_and_postgresql_are_accepted(home):
    with pytest.raises(ValueError, match="sqlite or PostgreSQL"):
        InferenceLog("mysql+pymysql://u@localhost/db")
    with pytest.raises(ValueError, match="not memory"):
        InferenceLog("sqlite://")


def test_probability_vectors_round_trip_and_old_logs_gain_the_column(tmp_path):
    import numpy as np

    from serving.inference_log import decode_probs, encode_probs

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the table as an older Champion created it, with one row in it
        conn.execute(sa.text(
            "CREATE TABLE champion_predictions (id INTEGER PRIMARY KEY, request_id VARCHAR(64) NOT NULL, "
            "at DATETIME NOT NULL, model_name VARCHAR(256) NOT NULL, model_version VARCHAR(32) NOT NULL, "
            "arm VARCHAR(16) NOT NULL, text TEXT NOT NULL, label VARCHAR(256) NOT NULL, "
            "score FLOAT NOT NULL, latency_ms FLOAT NOT NULL, agrees BOOLEAN, UNIQUE (request_id, arm))"
        ))  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO champion_predictions (request_id, at, model_name, model_version, arm, text, label, "
            "score, latency_ms) VALUES ('old', '2030-01-01 00:00:00', 'm', '1', 'champion', 't', 'a', 0.9, 1)"
        ))  # fmt: skip
    engine.dispose()
    row = np.array([0.7, 0.2, 0.1], dtype=np.float32)
    log = InferenceLog(url, retention_days=None).start()
    log.append([replace(_records(1)[0], request_id="new", probs=encode_probs(row))])
    log.flush()
    frame = log.read().set_index("request_id")
    log.close()
    assert frame.loc["old", "probs"] is None and decode_probs(frame.loc["old", "probs"]) is None
    assert np.allclose(decode_probs(frame.loc["new", "probs"]), row, atol=1e-3)
    assert len(encode_probs(np.zeros(77))) == 154  # 2 bytes a class
    with pytest.raises(TypeError, match="PredictionRecord.probs must be bytes"):
        replace(_records(1)[0], probs=[0.5, 0.5])
