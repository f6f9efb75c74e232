"""The spool and its writer when the disk fails them: a partial write is cut off and refused, never
acknowledged, and a writer that hits an error logs it, waits and goes on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from serving.inference_log import InferenceLog, PredictionRecord

ROOT = Path(__file__).resolve().parents[1]

# Run in a child: RLIMIT_FSIZE limits every file the process writes. With SIGXFSZ ignored, a write that
# crosses the limit is cut short and the next one fails with EFBIG, as a full disk cuts with ENOSPC.
DISK_FULL = r"""
import json, resource, signal, sys, uuid
from datetime import UTC, datetime
from serving import inference_log
from serving.inference_log import InferenceLog, PredictionRecord

LogWriteError = getattr(inference_log, "LogWriteError", OSError)  # so the old code runs this too

url, spool = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
log = InferenceLog(url, spool_dir=spool, batch_size=50)
acknowledged, refused = [], []

def batch(n=7):
    records = [PredictionRecord(uuid.uuid4().hex, datetime.now(UTC), "intents", "3", "champion",
                                "where is my order " + "x" * i, "track_order", 0.9, 1.5) for i in range(n)]
    try:
        log.append(records)
    except (LogWriteError, OSError) as err:  # the service answers 503: nobody was told they were logged
        refused.append(str(err))
        return
    acknowledged.extend(r.request_id for r in records)

batch()  # opens the spool's files
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, hard))  # the disk fills in the middle of a batch
for _ in range(60):
    batch()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
for _ in range(30):
    batch()
log.start()
try:
    log.flush(timeout=10)
except Exception as err:  # reported through "left" below
    print(err, file=sys.stderr)
left = log.close(timeout=5)
print(json.dumps({"acknowledged": acknowledged, "refused": refused, "left": left}))
"""


def test_a_disk_full_partial_write_loses_no_acknowledged_prediction(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference.db'}"
    spool = tmp_path / "spool"
    run = subprocess.run(
        [sys.executable, "-c", DISK_FULL, url, str(spool)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["refused"], "the limit never cut a write: the test proves nothing"
    assert result["left"] == 0
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT request_id, text FROM champion_predictions")).all()
    engine.dispose()
    logged = [r.request_id for r in rows]
    assert sorted(logged) == sorted(result["acknowledged"])  # every one, and nothing else
    assert all(r.text.startswith("where is my order") for r in rows)
    assert not (spool / "rejected.jsonl").exists(), (spool / "rejected.jsonl").read_text()[:500]
    assert "spool at" in result["refused"][0] and "cannot be written" in result["refused"][0]


def _records(n: int) -> list[PredictionRecord]:
    now = datetime.now(UTC)
    return [
        PredictionRecord(uuid.uuid4().hex, now, "intents", "3", "champion", f"text {i}", "a", 0.9, 1.0)
        for i in range(n)
    ]


def test_the_writer_survives_an_error_says_so_and_ships_once_it_clears(tmp_path):
    from serving.metrics import metrics

    spool = tmp_path / "spool"
    log = InferenceLog(f"sqlite:///{tmp_path / 'inference.db'}", spool_dir=spool, flush_seconds=0.05)
    try:
        log.append(_records(3))
        log.spool.append(b"a line edited by hand\n")  # must be set aside in rejected.jsonl ...
        (spool / "rejected.jsonl").mkdir()  # ... which cannot be written (as on a full disk)
        records = _records(4)
        log.append(records)
        errors = getattr(metrics(), "log_writer_errors", None)
        errors_before = errors._value.get() if errors else 0
        log.start()
        deadline = time.monotonic() + 10
        while getattr(log, "writer_problem", None) is None and log._thread.is_alive():
            assert time.monotonic() < deadline, "the writer never reported its failure"
            time.sleep(0.05)
        assert log._thread.is_alive(), "the writer thread died"
        assert "IsADirectoryError" in log.writer_problem and log.writer_alive
        assert errors._value.get() > errors_before
        (spool / "rejected.jsonl").rmdir()  # the disk has room again
        log.flush(timeout=20)
        assert log.writer_problem is None and log.written == 7
        assert (spool / "rejected.jsonl").read_bytes() == b"a line edited by hand\n"
        assert set(log.read()["request_id"]) >= {r.request_id for r in records}
    finally:
        log.close(timeout=5)
