"""`champion schedule`: APScheduler 3 with a SQLAlchemy job store, exactly one active scheduler per store.

APScheduler does not coordinate schedulers that share a job store (two would run every job twice), so the
active one holds a lock for its whole life: a PostgreSQL session advisory lock on a dedicated connection,
or a file lock beside a sqlite store. A second `schedule start` refuses with a sentence naming the holder,
or with `--standby` waits and takes over when the holder dies (its lock goes with its session or process).

Jobs come from `configs/schedule.yaml` with stable ids. At start the scheduler comes up paused, adds the
jobs the store lacks, changes only what changed (re-adding a job would reset its next run time and drop a
missed run), removes jobs no longer configured, then resumes: a run missed while no scheduler was up runs
once on start (`coalesce`), within `misfire_grace_seconds` (default: the job's interval).

Every run is recorded in `champion_job_runs` (start, end, outcome, error, result); a failing job is
recorded and logged, and the scheduler goes on.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from datetime import UTC, datetime, timedelta
from importlib import import_module
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import Field, field_validator, model_validator

from champion.config import StrictModel, champion_home
from champion.errors import ChampionError

log = logging.getLogger(__name__)

JOBS_TABLE = "champion_jobs"
_LOCK_KEYS = (0x43484D50, 0x5343)  # pg_try_advisory_lock(int, int): "CHMP", "SC"
_RUNNER = "monitoring.scheduler:run_job"


# --- config -------------------------------------------------------------------------------------------------


class Trigger(StrictModel):
    """Exactly one of: `interval` (keyword arguments such as {minutes: 60}) or `cron` (a crontab line)."""

    interval: dict[str, float] | None = None
    cron: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Trigger:
        if (self.interval is None) == (self.cron is None):
            raise ValueError("give exactly one of interval (e.g. {minutes: 60}) or cron (e.g. '15 * * * *')")
        if self.interval is not None:
            allowed = {"weeks", "days", "hours", "minutes", "seconds"}
            unknown = sorted(set(self.interval) - allowed)
            if unknown or not self.interval or sum(self.interval.values()) <= 0:
                raise ValueError(f"interval takes positive {', '.join(sorted(allowed))}; got {self.interval}")
        return self

    def build(self):
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        if self.interval is not None:
            return IntervalTrigger(**self.interval, timezone=UTC)
        try:
            return CronTrigger.from_crontab(self.cron, timezone=UTC)
        except ValueError as err:
            raise ChampionError(f"trigger.cron: '{self.cron}' is not a crontab line ({err}).") from None

    def seconds(self) -> float | None:
        if self.interval is None:
            return None
        return timedelta(**self.interval).total_seconds()


class JobConfig(StrictModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    func: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # module:function, importable
    kwargs: dict[str, Any] = Field(default_factory=dict)
    trigger: Trigger
    misfire_grace_seconds: float | None = Field(None, gt=0)  # default: the interval (or an hour for cron)
    enabled: bool = True

    @field_validator("func")
    @classmethod
    def _importable(cls, ref: str) -> str:
        module, _, name = ref.partition(":")
        try:
            func = getattr(import_module(module), name)
        except (ImportError, AttributeError):
            raise ValueError(f"'{ref}' cannot be imported; name a module:function on the path") from None
        if not callable(func):
            raise ValueError(f"'{ref}' is not a function")
        return ref

    def grace(self) -> float:
        return self.misfire_grace_seconds or self.trigger.seconds() or 3600.0


class ScheduleConfig(StrictModel):
    store_url: str | None = None  # default sqlite:///$CHAMPION_HOME/scheduler.db; PostgreSQL to share one
    metrics_port: int | None = Field(9464, ge=0, le=65535)  # /metrics of the scheduler; None: none
    metrics_host: str = "127.0.0.1"
    workers: int = Field(2, ge=1)  # jobs that may run at the same time (each job at most once)
    jobs: list[JobConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> ScheduleConfig:
        ids = [j.id for j in self.jobs]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"job ids must be unique; {', '.join(twice)} appear more than once")
        return self

    def url(self) -> str:
        return self.store_url or os.environ.get("CHAMPION_SCHEDULER_URL") or (
            f"sqlite:///{champion_home() / 'scheduler.db'}"
        )  # fmt: skip


# --- the run record -----------------------------------------------------------------------------------------

_metadata = sa.MetaData()
job_runs = sa.Table(
    "champion_job_runs",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(256), nullable=False, index=True),
    sa.Column("started", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended", sa.DateTime(timezone=True)),
    sa.Column("outcome", sa.String(16), nullable=False),  # running | ok | failed
    sa.Column("error", sa.Text),
    sa.Column("result", sa.Text),  # JSON
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("how", sa.String(16), nullable=False),  # scheduled | run-now
)


def _engine(url: str) -> sa.Engine:
    engine = sa.create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite" and engine.url.database:
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    return engine


def run_job(job_id: str, func: str, kwargs: dict[str, Any], runs_url: str, how: str = "scheduled") -> None:
    """What APScheduler calls: run `func(**kwargs)`, record the run, never raise into the scheduler."""
    engine = _engine(runs_url)
    started = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            _metadata.create_all(conn, checkfirst=True)
            run_id = conn.execute(
                job_runs.insert().values(
                    job_id=job_id, started=started, outcome="running", host=socket.gethostname(),
                    pid=os.getpid(), how=how,
                )
            ).inserted_primary_key[0]  # fmt: skip
    except Exception as err:  # the run record is down: still run the job, and say so
        log.error("job %s: could not record its start (%s)", job_id, _first_line(err))
        run_id = None
    outcome, error, result = "ok", None, None
    clock = time.perf_counter()
    try:
        module, _, name = func.partition(":")
        result = getattr(import_module(module), name)(**kwargs)
    except Exception as err:
        outcome = "failed"
        error = str(err) if isinstance(err, ChampionError) else f"{type(err).__name__}: {err}"
        log.error("job %s failed: %s", job_id, error)
        log.debug("%s", traceback.format_exc())
    _observe_run(job_id, outcome, time.perf_counter() - clock)
    if run_id is not None:
        try:
            with engine.begin() as conn:
                conn.execute(
                    job_runs.update().where(job_runs.c.id == run_id).values(
                        ended=datetime.now(UTC), outcome=outcome, error=error,
                        result=json.dumps(result, default=str) if result is not None else None,
                    )
                )  # fmt: skip
        except Exception as err:
            log.error("job %s: could not record its end (%s)", job_id, _first_line(err))
    engine.dispose()


def _observe_run(job_id: str, outcome: str, seconds: float) -> None:
    from monitoring.metrics import metrics

    m = metrics()
    m.job_runs.labels(job_id, outcome).inc()
    m.job_last_duration.labels(job_id).set(seconds)
    if outcome == "ok":
        m.job_last_success.labels(job_id).set(time.time())


def job_history(url: str, job_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            _metadata.create_all(conn, checkfirst=True)
            query = sa.select(job_runs).order_by(job_runs.c.id.desc()).limit(limit)
            if job_id is not None:
                query = query.where(job_runs.c.job_id == job_id)
            return [dict(r._mapping) for r in conn.execute(query)]
    finally:
        engine.dispose()


# --- one active scheduler per store -------------------------------------------------------------------------


def _me() -> str:
    return f"champion-scheduler on {socket.gethostname()} pid {os.getpid()}"


class _FileLeader:
    """flock on a file beside the sqlite store; the holder writes who it is into it."""

    def __init__(self, database: str):
        self.path = Path(database).with_suffix(".leader")
        self._fh = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 (held open for the scheduler's life)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(f"{_me()} since {datetime.now(UTC).isoformat(timespec='seconds')}\n")
        fh.flush()
        self._fh = fh
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "an unknown process"
        except OSError:
            return "an unknown process"

    def healthy(self) -> bool:
        return self._fh is not None

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class _PostgresLeader:
    """A session advisory lock on a dedicated, unpooled connection; it goes when the session goes."""

    def __init__(self, url: str):
        parsed = sa.engine.make_url(url)
        self.dsn = {
            "host": parsed.host or "localhost",
            "port": parsed.port or 5432,
            "user": parsed.username,
            "password": parsed.password,
            "dbname": parsed.database,
        }
        self._conn = None

    def _connect(self, name: str):
        import psycopg2

        conn = psycopg2.connect(
            **{k: v for k, v in self.dsn.items() if v is not None}, application_name=name[:63],
            connect_timeout=5, keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
        )  # fmt: skip
        conn.autocommit = True
        return conn

    def try_acquire(self) -> bool:
        conn = self._connect(_me())
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", _LOCK_KEYS)
            got = cur.fetchone()[0]
        if got:
            self._conn = conn
        else:
            conn.close()
        return bool(got)

    def holder(self) -> str:
        conn = self._connect("champion-scheduler probe")
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.classid = %s AND l.objid = %s AND l.database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())",
                    _LOCK_KEYS,
                )
                row = cur.fetchone()
        finally:
            conn.close()
        if row is None:
            return "nobody (it was just released)"
        name, addr, since = row
        return f"{name} (from {addr or 'the local socket'}, connected {since:%Y-%m-%d %H:%M:%S %Z})"

    def healthy(self) -> bool:
        if self._conn is None:
            return False
        try:
            with self._conn.cursor() as cur:
                cur.execute("SELECT 1")
            return True
        except Exception:
            return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def leader_lock(url: str):
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return _PostgresLeader(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return _FileLeader(parsed.database)
    raise ChampionError(f"store_url: the scheduler needs a sqlite file or a PostgreSQL URL; got '{url}'.")


# --- the scheduler ------------------------------------------------------------------------------------------


def _scheduler(url: str, workers: int = 2):
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    return BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=url, tablename=JOBS_TABLE)},
        executors={"default": ThreadPoolExecutor(workers)},
        job_defaults={"coalesce": True, "max_instances": 1},
        timezone=UTC,
    )


def sync_jobs(sched, cfg: ScheduleConfig, url: str) -> dict[str, list[str]]:
    """Make the store hold exactly the configured jobs, touching only what changed (missed runs survive)."""
    changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "kept": []}
    wanted = {j.id: j for j in cfg.jobs if j.enabled}
    for job in sched.get_jobs():
        if job.id not in wanted:
            sched.remove_job(job.id)
            changes["removed"].append(job.id)
    for job_id, j in wanted.items():
        trigger = j.trigger.build()
        args = [job_id, j.func, j.kwargs, url]
        existing = sched.get_job(job_id)
        if existing is None:
            sched.add_job(
                _RUNNER, trigger, args=args, id=job_id, name=job_id, misfire_grace_time=int(j.grace()),
                coalesce=True, max_instances=1, replace_existing=False,
            )  # fmt: skip
            changes["added"].append(job_id)
            continue
        if list(existing.args) != args or existing.misfire_grace_time != int(j.grace()):
            sched.modify_job(job_id, args=args, misfire_grace_time=int(j.grace()))
            changes["changed"].append(job_id)
        if str(existing.trigger) != str(trigger):
            sched.reschedule_job(job_id, trigger=trigger)
            if job_id not in changes["changed"]:
                changes["changed"].append(job_id)
        elif job_id not in changes["changed"]:
            changes["kept"].append(job_id)
    return changes


def start(cfg: ScheduleConfig, standby: bool = False, poll_seconds: float = 2.0, out=print) -> None:
    """Run the scheduler in this process until SIGTERM or Ctrl-C (what `champion schedule start` does)."""
    url = cfg.url()
    lock = leader_lock(url)
    safe = sa.engine.make_url(url).render_as_string(hide_password=True)
    while not lock.try_acquire():
        if not standby:
            raise ChampionError(
                f"another scheduler is active on {safe}: {lock.holder()}; stop it first, or start this one "
                f"with --standby to take over when it stops."
            )
        out(f"standby: {lock.holder()} is active on {safe}; checking again in {poll_seconds:g} s")
        _sleep(poll_seconds)
    stop_event = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    sched = _scheduler(url, cfg.workers)
    try:
        sched.start(paused=True)  # add and change jobs before anything runs, so missed runs are kept
        changes = sync_jobs(sched, cfg, url)
        sched.resume()
        _serve_metrics(cfg)
        out(
            f"scheduler active on {safe} as {_me()}: "
            + ", ".join(f"{k} {v}" for k, v in changes.items() if v)
        )
        for job in sched.get_jobs():
            out(f"  {job.id}: {job.trigger}, next run {job.next_run_time:%Y-%m-%d %H:%M:%S %Z}")
        while not stop_event.is_set():
            stop_event.wait(poll_seconds)
            if not lock.healthy():
                out("lost the scheduler lock (its database connection died); stopping at once")
                sched.shutdown(wait=False)
                raise ChampionError(f"the scheduler lost its lock on {safe}; a standby may take over.")
            sched.wakeup()  # picks up pause, resume and run-now from `champion schedule` in other processes
    except KeyboardInterrupt:
        pass
    finally:
        if sched.running:
            out("stopping: waiting for running jobs to finish")
            sched.shutdown(wait=True)
        lock.release()
        _set_leader(0)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _serve_metrics(cfg: ScheduleConfig) -> None:
    if cfg.metrics_port is None:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(cfg.metrics_port, addr=cfg.metrics_host)
    except OSError as err:
        raise ChampionError(
            f"metrics_port: {cfg.metrics_host}:{cfg.metrics_port} is taken ({err}); pick another port."
        ) from None
    _set_leader(1)


def _set_leader(value: int) -> None:
    from monitoring.metrics import metrics

    metrics().leader.set(value)


# --- commands on the store from other processes -------------------------------------------------------------


def _with_store(cfg: ScheduleConfig, action):
    """Run `action(store)` on the job store itself. A second scheduler, even paused, must not be started on
    it: one shutting down may still submit a due job, and then moves its next run time on."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    store = SQLAlchemyJobStore(url=cfg.url(), tablename=JOBS_TABLE)
    store.start(BackgroundScheduler(timezone=UTC), "default")  # never started: it only unpickles jobs
    try:
        return action(store)
    finally:
        store.shutdown()


def _set_next_run(store, job_id: str, when) -> None:
    job = _job_or_error(store, job_id)
    job.next_run_time = when(job)
    store.update_job(job)


def list_jobs(cfg: ScheduleConfig) -> list[dict[str, Any]]:
    url = cfg.url()
    runs = job_history(url, limit=500)
    last = {}
    for r in runs:
        last.setdefault(r["job_id"], r)

    def read(store):
        return [
            {
                "id": job.id,
                "trigger": str(job.trigger),
                "next_run": job.next_run_time.isoformat(timespec="seconds") if job.next_run_time else None,
                "paused": job.next_run_time is None,
                "func": job.args[1] if len(job.args) > 1 else job.func_ref,
                "last_outcome": last.get(job.id, {}).get("outcome"),
                "last_started": str(last[job.id]["started"]) if job.id in last else None,
                "last_error": last.get(job.id, {}).get("error"),
            }
            for job in store.get_all_jobs()
        ]

    return _with_store(cfg, read)


def _job_or_error(store, job_id: str):
    job = store.lookup_job(job_id)
    if job is None:
        known = ", ".join(j.id for j in store.get_all_jobs()) or "none"
        raise ChampionError(
            f"JOB: no job '{job_id}' in the store (jobs: {known}); `champion schedule start` adds the "
            f"configured ones."
        )
    return job


def pause(cfg: ScheduleConfig, job_id: str) -> None:
    """No more runs until resumed; the active scheduler sees it at its next look at the store (2 s)."""
    _with_store(cfg, lambda store: _set_next_run(store, job_id, lambda job: None))


def resume(cfg: ScheduleConfig, job_id: str) -> None:
    now = datetime.now(UTC)
    _with_store(
        cfg, lambda store: _set_next_run(store, job_id, lambda job: job.trigger.get_next_fire_time(None, now))
    )


def run_now(cfg: ScheduleConfig, job_id: str, wait_seconds: float = 600.0) -> dict[str, Any]:
    """Run a job now: through the active scheduler when there is one (so it never runs twice at once),
    else in this process. Returns its run record."""
    url = cfg.url()
    job = _with_store(cfg, lambda store: _job_or_error(store, job_id))
    before = max((r["id"] for r in job_history(url, job_id, limit=1)), default=0)
    lock = leader_lock(url)
    if lock.try_acquire():  # nobody is active: run it here, holding the lock so no scheduler starts meanwhile
        try:
            run_job(job_id, job.args[1], job.args[2], url, how="run-now")
        finally:
            lock.release()
    else:
        _with_store(cfg, lambda store: _set_next_run(store, job_id, lambda job: datetime.now(UTC)))
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            latest = job_history(url, job_id, limit=1)
            if latest and latest[0]["id"] > before and latest[0]["outcome"] != "running":
                return latest[0]
            time.sleep(0.5)
        raise ChampionError(
            f"JOB: '{job_id}' was handed to the active scheduler but did not finish in {wait_seconds:g} s."
        )
    return job_history(url, job_id, limit=1)[0]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
