"""`champion schedule`: real scheduler processes on one sqlite or PostgreSQL job store."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from champion.config import load_config
from champion.errors import ChampionError
from monitoring.scheduler import ScheduleConfig, job_history, job_runs, run_job

TESTS = Path(__file__).resolve().parent


def _job(job_id: str, every: float | None = None, cron: str | None = None, func: str = "sched_jobs:tick",
         **extra) -> dict:  # fmt: skip
    trigger = {"interval": {"seconds": every}} if every is not None else {"cron": cron}
    return {"id": job_id, "func": func, "trigger": trigger, **extra}


def _config(tmp_path: Path, jobs: list[dict], store_url: str | None = None, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"store_url": store_url, "metrics_port": None, "jobs": jobs}))
    return path


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "CHAMPION_HOME": str(home), "PYTHONPATH": str(TESTS)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


class Scheduler:
    """A `champion schedule start` process; its output goes to a file."""

    def __init__(self, config: Path, home: Path, log: Path, *extra: str):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "champion_cli", "schedule", "start", "--config", str(config), *extra],
                stdout=out, stderr=subprocess.STDOUT, env=_env(home), start_new_session=True,
            )  # fmt: skip

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"no '{text}' in the scheduler's output:\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=60)


def _cli(config: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "champion_cli", "schedule", *args, "--config", str(config)],
        capture_output=True, text=True, env=_env(home), timeout=120,
    )  # fmt: skip


def _runs(url: str, job: str) -> list[dict]:
    return list(reversed(job_history(url, job, limit=1000)))


def _wait_runs(url: str, job: str, count: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(done := [r for r in _runs(url, job) if r["outcome"] != "running"]) < count:
        assert time.monotonic() < deadline, f"only {len(done)} runs of {job}"
        time.sleep(0.2)
    return done


@pytest.fixture
def sqlite_url(home) -> str:
    return f"sqlite:///{home / 'scheduler.db'}"


def test_a_second_scheduler_on_the_same_store_refuses_naming_the_holder(tmp_path, home, sqlite_url):
    config = _config(tmp_path, [_job("tick", 1), _job("boom", 1, func="sched_jobs:fail")])
    first = Scheduler(config, home, tmp_path / "first.log")
    try:
        first.wait_for("scheduler active")
        second = _cli(config, home, "start")
        assert second.returncode == 2
        assert f"another scheduler is active on {sqlite_url}: champion-scheduler on" in second.stderr
        assert f"pid {first.proc.pid}" in second.stderr and "--standby" in second.stderr
        # A job that always fails is recorded each time and stops nothing: the other job keeps running.
        failed = _wait_runs(sqlite_url, "boom", 2)
        assert all(
            r["outcome"] == "failed" and r["error"] == "RuntimeError: this job always fails" for r in failed
        )
        ticks = _wait_runs(sqlite_url, "tick", len(_runs(sqlite_url, "tick")) + 2)
        assert {r["pid"] for r in ticks} == {first.proc.pid} and all(r["outcome"] == "ok" for r in ticks)
    finally:
        assert first.stop() == 0
    assert "stopping: waiting for running jobs to finish" in first.log.read_text()


@pytest.mark.postgres
def test_postgres_store_one_active_scheduler_and_a_standby_that_takes_over(tmp_path, home, pg_url):
    config = _config(tmp_path, [_job("tick", 1)], store_url=pg_url)
    leader = Scheduler(config, home, tmp_path / "leader.log")
    leader.wait_for("scheduler active")
    refused = _cli(config, home, "start")
    assert refused.returncode == 2 and "another scheduler is active on postgresql" in refused.stderr
    assert f"champion-scheduler on {os.uname().nodename} pid {leader.proc.pid}" in refused.stderr
    standby = Scheduler(config, home, tmp_path / "standby.log", "--standby")
    try:
        standby.wait_for("standby: champion-scheduler on")
        before = _wait_runs(pg_url, "tick", 4)
        assert {r["pid"] for r in before} == {leader.proc.pid}  # the standby ran nothing while waiting
        leader.stop(signal.SIGKILL)  # the lock goes with the dead session
        killed_at = time.time()
        standby.wait_for("scheduler active", timeout=30)
        after = _wait_runs(pg_url, "tick", len(_runs(pg_url, "tick")) + 3)
        taken = [r for r in after if r["pid"] == standby.proc.pid]
        assert taken and taken[0]["started"].timestamp() - killed_at < 15
        # Never more runs than slots of the 1 s grid (two active schedulers would run each slot twice); the
        # slot missed while nobody was active may run late, once, as a catch-up.
        starts = sorted(r["started"].timestamp() for r in after)
        slots = round(starts[-1] - starts[0]) + 1
        assert len(starts) <= slots, starts
    finally:
        standby.stop()
        leader.stop()


def test_a_restart_catches_up_a_missed_run_once(tmp_path, home, sqlite_url):
    interval = 4.0
    config = _config(tmp_path, [_job("tick", interval, misfire_grace_seconds=60)])
    first = Scheduler(config, home, tmp_path / "a.log")
    first.wait_for("scheduler active")
    (first_run,) = _wait_runs(sqlite_url, "tick", 1)
    assert first.stop() == 0
    time.sleep(2 * interval + 1)  # two runs are missed
    restarted = time.time()
    second = Scheduler(config, home, tmp_path / "b.log")
    try:
        second.wait_for(
            "kept ['tick']"
        )  # not re-added: that would reset its next run and drop the missed one
        # The job keeps its grid (first run + k * interval): before the next slot only the catch-up runs.
        grid = first_run["started"].timestamp()
        next_slot = grid + interval * (1 + int((restarted - grid) // interval))
        time.sleep(max(0.0, next_slot + interval - 0.5 - time.time()))
        after = [r["started"].timestamp() for r in _runs(sqlite_url, "tick")[1:]]
        catch_up = [t for t in after if t < next_slot - 0.5]
        regular = [t for t in after if next_slot - 0.5 <= t]
        assert len(catch_up) == 1, (after, next_slot)  # the two missed runs ran once (coalesced), at start
        assert len(regular) == 1, (after, next_slot)  # then the schedule goes on as before
    finally:
        second.stop()


def test_pause_resume_and_run_now_from_another_process(tmp_path, home, sqlite_url):
    config = _config(tmp_path, [_job("tick", 1), _job("daily", cron="0 3 * * *")])
    sched = Scheduler(config, home, tmp_path / "s.log")
    try:
        sched.wait_for("scheduler active")
        _wait_runs(sqlite_url, "tick", 1)
        assert _cli(config, home, "pause", "tick").returncode == 0
        time.sleep(3)  # the scheduler looks at the store every 2 s
        paused_at = len(_runs(sqlite_url, "tick"))
        time.sleep(3)
        assert len(_runs(sqlite_url, "tick")) == paused_at
        listed = _cli(config, home, "list")
        assert listed.returncode == 0 and "paused" in listed.stdout
        assert _cli(config, home, "resume", "tick").returncode == 0
        _wait_runs(sqlite_url, "tick", paused_at + 1, timeout=10)
        # The daily job runs now, through the active scheduler (so never twice at once).
        now = _cli(config, home, "run-now", "daily")
        assert now.returncode == 0 and f"daily: ok (scheduled, pid {sched.proc.pid})" in now.stdout
        unknown = _cli(config, home, "pause", "nightly")
        assert unknown.returncode == 2 and "no job 'nightly' in the store (jobs: " in unknown.stderr
    finally:
        sched.stop()
    # With no scheduler running, run-now runs the job in the calling process.
    alone = _cli(config, home, "run-now", "daily")
    assert alone.returncode == 0 and "daily: ok (run-now, pid" in alone.stdout


class _Planted:
    """A pickle whose unpickling writes `marker`: what a writer of the store could plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",)


def test_no_pickle_planted_in_the_store_is_ever_unpickled(tmp_path, home, sqlite_url):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Planted(marker))
    text = payload.decode("latin-1")
    past = datetime.now(UTC) - timedelta(seconds=30)
    home.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        for table in ("champion_jobs", "apscheduler_jobs"):  # the SQLAlchemyJobStore tables, as 3.x made them
            conn.execute(sa.text(f"CREATE TABLE {table} (id VARCHAR(191) PRIMARY KEY, next_run_time FLOAT, "
                                 "job_state BLOB NOT NULL)"))  # fmt: skip
            conn.execute(
                sa.text(f"INSERT INTO {table} VALUES ('tick', :t, :p)"), {"t": past.timestamp(), "p": payload}
            )
        job_runs.metadata.create_all(conn)
        run = {"started": past, "ended": past, "host": "h", "pid": 1, "how": "scheduled"}
        conn.execute(
            job_runs.insert().values(job_id="tick", outcome="failed", error=text, result=text, **run)
        )
    config = _config(tmp_path, [_job("tick", 1)])
    for args in (["list"], ["list", "--json"], ["pause", "tick"], ["resume", "tick"], ["run-now", "tick"]):
        done = _cli(config, home, *args)
        assert not marker.exists(), (args, done.stderr)
    # The state rows are plain columns; planted text in them is only text.
    from monitoring.scheduler import job_state

    with engine.begin() as conn:
        conn.execute(job_state.delete())
        conn.execute(job_state.insert().values(job_id="tick", func=text[:200], trigger=text[:200], spec=text,
                                               next_run=past, paused=False, updated=past))  # fmt: skip
    engine.dispose()
    for args in (["list"], ["list", "--json"], ["pause", "tick"], ["resume", "tick"]):
        done = _cli(config, home, *args)
        assert done.returncode == 0 and not marker.exists(), (args, done.stderr)
    sched = Scheduler(config, home, tmp_path / "s.log")
    try:
        sched.wait_for("scheduler active")
        sched.wait_for("champion_jobs (pickled jobs of earlier versions) is never read")
        assert "changed ['tick']" in sched.log.read_text()  # the planted spec is just a spec that changed
        _wait_runs(sqlite_url, "tick", 2)
        for args in (["list"], ["pause", "tick"], ["resume", "tick"], ["run-now", "tick"]):
            done = _cli(config, home, *args)
            assert done.returncode == 0 and not marker.exists(), (args, done.stderr)
    finally:
        assert sched.stop() == 0
    assert not marker.exists()
    with sa.create_engine(sqlite_url).connect() as conn:  # left alone: the operator drops it
        assert conn.execute(sa.text("SELECT count(*) FROM champion_jobs")).scalar() == 1


def test_a_failing_drift_job_is_recorded_with_its_sentence(home, sqlite_url):
    run_job("drift", "monitoring.jobs:drift_check", {"model": "no-such-model"}, sqlite_url)
    (run,) = job_history(sqlite_url, "drift")
    assert run["outcome"] == "failed" and "no-such-model" in run["error"] and run["ended"] >= run["started"]


DRIFT = "monitoring.jobs:drift_check"


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([_job("x", 60, func="monitoring.jobs:nope")], "cannot be imported"),
        ([{**_job("x", 60, func=DRIFT), "trigger": {"interval": {"minutes": 1}, "cron": "* * * * *"}}],
         "exactly one of interval"),
        ([{**_job("x", 60, func=DRIFT), "trigger": {"interval": {"fortnights": 1}}}], "interval takes"),
        ([_job("x", cron="0 3 * * *", func=DRIFT)] * 2, "x appear more than once"),
    ],
)  # fmt: skip
def test_bad_schedule_config_is_one_sentence(tmp_path, jobs, message):
    with pytest.raises(ChampionError, match=message):
        load_config(ScheduleConfig, _config(tmp_path, jobs))


def test_the_shipped_schedule_config_validates_and_names_its_command():
    path = TESTS.parent / "configs" / "schedule.yaml"
    cfg = load_config(ScheduleConfig, path)
    assert path.read_text().splitlines()[0] == "# champion schedule start --config configs/schedule.yaml"
    drift, retrain, review, approvals = cfg.jobs
    assert drift.func == "monitoring.jobs:drift_check" and drift.grace() == 3600
    assert retrain.func == "pipelines.jobs:retrain_on_drift" and retrain.grace() == 3600
    assert retrain.kwargs["config"] == "configs/retrain.yaml"
    assert review.func == "monitoring.jobs:review_select" and approvals.func == "monitoring.jobs:approvals"
    from monitoring.review import ReviewConfig

    assert load_config(ReviewConfig, TESTS.parent / review.kwargs["config"]).daily_budget == 200
