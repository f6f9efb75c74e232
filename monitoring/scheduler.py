"""`champion schedule`: APScheduler 3 with jobs held in memory, exactly one active scheduler per store.

Nothing the store holds is ever unpickled. The jobs are rebuilt from the schedule config at every start and
live in APScheduler's MemoryJobStore; what must outlive a process is plain data in SQL columns: each job's
state in `champion_job_state` (paused or not, next run, the interval's grid, a run asked for) and each run in
`champion_job_runs`. Whoever can write the store can therefore pause, resume or hasten a configured job, but
cannot make a scheduler or an operator's `champion schedule list` run code of their choosing: the function a
job calls always comes from the config on the operator's disk. (`champion_jobs`, the pickled job table of
earlier versions, is never read; it is left alone for the operator to drop.)

APScheduler does not coordinate schedulers that share a store (two would run every job twice), so the
active one holds a lock for its whole life: a PostgreSQL session advisory lock on a dedicated connection,
or a file lock beside a sqlite store. A second `schedule start` refuses with a sentence naming the holder,
or with `--standby` waits and takes over when the holder dies (its lock goes with its session or process).

Jobs come from `configs/schedule.yaml` with stable ids. At start each job takes back its stored next run
(unless its trigger changed): a run missed while no scheduler was up runs once on start (`coalesce`), within
`misfire_grace_seconds` (default: the job's interval). `pause`, `resume` and `run-now` from other processes
write the job's state row; the active scheduler reads it every couple of seconds.

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
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from pydantic import Field, field_validator, model_validator

from champion.config import StrictModel, champion_home, redact_uri
from champion.db import create_tables, engine_for
from champion.errors import ChampionError

log = logging.getLogger(__name__)

LEGACY_JOBS_TABLE = "champion_jobs"  # pickled APScheduler jobs of earlier versions: never read
_LOCK_KEYS = (0x43484D50, 0x5343)  # pg_try_advisory_lock(int, int): "CHMP", "SC"


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

    def build(self, anchor: datetime | None = None):
        """The APScheduler trigger; `anchor` keeps an interval on the grid it had (its start date)."""
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        if self.interval is not None:
            return IntervalTrigger(**self.interval, start_date=anchor, timezone=UTC)
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
job_state = sa.Table(
    "champion_job_state",
    _metadata,
    sa.Column("job_id", sa.String(256), primary_key=True),
    sa.Column("func", sa.String(256), nullable=False),  # shown by `list`; the config says what runs
    sa.Column("trigger", sa.String(256), nullable=False),  # shown by `list`
    sa.Column("spec", sa.Text, nullable=False),  # JSON: the job's config at the last start, to see changes
    sa.Column("anchor", sa.DateTime(timezone=True)),  # an interval's start date: its grid across restarts
    sa.Column("next_run", sa.DateTime(timezone=True)),  # written by the active scheduler
    sa.Column("paused", sa.Boolean, nullable=False),  # written by `pause` and `resume`
    sa.Column("run_requested", sa.DateTime(timezone=True)),  # `run-now` asks; the active scheduler clears
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
)


def _aware(value: datetime | None) -> datetime | None:
    """sqlite gives back naive datetimes; every time in these tables is UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def run_job(job_id: str, func: str, kwargs: dict[str, Any], runs_url: str, how: str = "scheduled") -> None:
    """What APScheduler calls: run `func(**kwargs)`, record the run, never raise into the scheduler."""
    engine = engine_for(runs_url)
    started = datetime.now(UTC)
    try:
        create_tables(engine, _metadata)
        with engine.begin() as conn:
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
    engine = engine_for(url)
    try:
        create_tables(engine, _metadata)
        with engine.connect() as conn:
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
    raise ChampionError(
        f"store_url: the scheduler needs a sqlite file or a PostgreSQL URL; got '{redact_uri(url)}'."
    )


# --- the scheduler ------------------------------------------------------------------------------------------


class _RecordingJobStore(MemoryJobStore):
    """APScheduler's in-memory store that writes each job's next run time to its state row, as plain data."""

    def __init__(self, engine: sa.Engine):
        super().__init__()
        self._engine = engine

    def add_job(self, job) -> None:
        super().add_job(job)
        self._record(job)

    def update_job(self, job) -> None:
        super().update_job(job)
        self._record(job)

    def _record(self, job) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    job_state.update().where(job_state.c.job_id == job.id)
                    .values(next_run=job.next_run_time, updated=datetime.now(UTC))
                )  # fmt: skip
        except Exception as err:  # the jobs run from memory: only `list` and the next start read this
            log.error("job %s: could not record its next run (%s)", job.id, _first_line(err))


def _scheduler(engine: sa.Engine, workers: int = 2) -> BackgroundScheduler:
    return BackgroundScheduler(
        jobstores={"default": _RecordingJobStore(engine)},
        executors={"default": ThreadPoolExecutor(workers)},
        job_defaults={"coalesce": True, "max_instances": 1},
        timezone=UTC,
    )


def _spec(j: JobConfig) -> str:
    about = {"func": j.func, "kwargs": j.kwargs, "trigger": j.trigger.model_dump(), "grace": j.grace()}
    return json.dumps(about, sort_keys=True, default=str)


def _stored_trigger(spec: str) -> Any:
    """The trigger part of a stored spec; None when it cannot be read (the job then starts afresh)."""
    try:
        return json.loads(spec)["trigger"]
    except (ValueError, TypeError, KeyError):
        return None


def sync_jobs(sched, cfg: ScheduleConfig, url: str, engine: sa.Engine) -> dict[str, list[str]]:
    """Add the configured jobs to the (paused) scheduler, each with its stored next run unless its trigger
    changed (so a missed run survives a restart), and make the state table hold exactly these jobs."""
    changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "kept": []}
    wanted = {j.id: j for j in cfg.jobs if j.enabled}
    now = datetime.now(UTC)
    planned = []
    with engine.begin() as conn:
        rows = {r.job_id: r for r in conn.execute(sa.select(job_state))}
        for job_id in sorted(set(rows) - set(wanted)):
            conn.execute(job_state.delete().where(job_state.c.job_id == job_id))
            changes["removed"].append(job_id)
        for job_id, j in wanted.items():
            row, spec = rows.get(job_id), _spec(j)
            same_trigger = row is not None and _stored_trigger(row.spec) == j.trigger.model_dump()
            trigger = j.trigger.build(_aware(row.anchor) if same_trigger else None)
            paused = bool(row is not None and row.paused)
            if paused:
                next_run = None
            elif same_trigger and row.next_run is not None:
                next_run = _aware(row.next_run)  # in the past if a run was missed: it runs once, now
            else:
                next_run = trigger.get_next_fire_time(None, now)
            changes["added" if row is None else "kept" if row.spec == spec else "changed"].append(job_id)
            values = {
                "func": j.func, "trigger": str(trigger)[:256], "spec": spec, "next_run": next_run,
                "anchor": trigger.start_date if j.trigger.interval is not None else None,
                "paused": paused, "updated": now,
            }  # fmt: skip
            if row is None:
                conn.execute(job_state.insert().values(job_id=job_id, **values))
            else:
                conn.execute(job_state.update().where(job_state.c.job_id == job_id).values(**values))
            planned.append((j, trigger, next_run))
    for j, trigger, next_run in planned:
        sched.add_job(
            run_job, trigger, args=[j.id, j.func, j.kwargs, url], id=j.id, name=j.id, next_run_time=next_run,
            misfire_grace_time=int(j.grace()), coalesce=True, max_instances=1,
        )  # fmt: skip
    return changes


def _take_commands(sched, engine: sa.Engine) -> None:
    """Apply what `pause`, `resume` and `run-now` wrote into the jobs' state rows (plain values only)."""
    c = job_state.c
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(c.job_id, c.paused, c.run_requested)).all()
        for job_id, paused, run_requested in rows:
            job = sched.get_job(job_id)
            if job is None:
                continue
            if run_requested is not None:
                sched.modify_job(job_id, next_run_time=datetime.now(UTC))  # a paused job runs once
                with engine.begin() as conn:
                    conn.execute(
                        job_state.update().where(c.job_id == job_id, c.run_requested == run_requested)
                        .values(run_requested=None)
                    )  # fmt: skip
            elif paused and job.next_run_time is not None:
                sched.pause_job(job_id)
            elif not paused and job.next_run_time is None:
                sched.resume_job(job_id)  # the next time on its grid; runs missed while paused are not run
    except Exception as err:  # the store is down for a moment: the jobs go on from memory
        log.error("could not read the jobs' state (%s); trying again shortly", _first_line(err))


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
    engine = engine_for(url)
    sched = _scheduler(engine, cfg.workers)
    try:
        create_tables(engine, _metadata)
        sched.start(paused=True)  # add the jobs with their stored next runs before anything runs
        changes = sync_jobs(sched, cfg, url, engine)
        sched.resume()
        _serve_metrics(cfg)
        out(
            f"scheduler active on {safe} as {_me()}: "
            + ", ".join(f"{k} {v}" for k, v in changes.items() if v)
        )
        if sa.inspect(engine).has_table(LEGACY_JOBS_TABLE):
            out(f"  {LEGACY_JOBS_TABLE} (pickled jobs of earlier versions) is never read; drop it at will")
        for job in sched.get_jobs():
            when = f"next run {job.next_run_time:%Y-%m-%d %H:%M:%S %Z}" if job.next_run_time else "paused"
            out(f"  {job.id}: {job.trigger}, {when}")
        while not stop_event.is_set():
            stop_event.wait(poll_seconds)
            if not lock.healthy():
                out("lost the scheduler lock (its database connection died); stopping at once")
                sched.shutdown(wait=False)
                raise ChampionError(f"the scheduler lost its lock on {safe}; a standby may take over.")
            _take_commands(sched, engine)
    except KeyboardInterrupt:
        pass
    finally:
        if sched.running:
            out("stopping: waiting for running jobs to finish")
            sched.shutdown(wait=True)
        lock.release()
        engine.dispose()
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


def _states(url: str) -> list[dict[str, Any]]:
    engine = engine_for(url)
    try:
        create_tables(engine, _metadata)
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(job_state).order_by(job_state.c.job_id))]
    finally:
        engine.dispose()


def list_jobs(cfg: ScheduleConfig) -> list[dict[str, Any]]:
    """The jobs as the store records them (plain columns: nothing is unpickled or imported)."""
    url = cfg.url()
    last: dict[str, dict] = {}
    for r in job_history(url, limit=500):
        last.setdefault(r["job_id"], r)
    out = []
    for row in _states(url):
        job_id, next_run, run = row["job_id"], _aware(row["next_run"]), last.get(row["job_id"], {})
        out.append({
            "id": job_id,
            "trigger": row["trigger"],
            "next_run": next_run.isoformat(timespec="seconds") if next_run and not row["paused"] else None,
            "paused": bool(row["paused"]),
            "func": row["func"],
            "last_outcome": run.get("outcome"),
            "last_started": str(run["started"]) if run else None,
            "last_error": run.get("error"),
        })  # fmt: skip
    return out


def _set_state(cfg: ScheduleConfig, job_id: str, values: dict[str, Any], *where) -> None:
    """Write a job's state row; the active scheduler applies it at its next look (every 2 s)."""
    engine = engine_for(cfg.url())
    c = job_state.c
    try:
        create_tables(engine, _metadata)
        with engine.begin() as conn:
            known = [r[0] for r in conn.execute(sa.select(c.job_id).order_by(c.job_id))]
            if job_id not in known:
                raise ChampionError(
                    f"JOB: no job '{job_id}' in the store (jobs: {', '.join(known) or 'none'}); "
                    f"`champion schedule start` adds the configured ones."
                )
            values = {**values, "updated": datetime.now(UTC)}
            conn.execute(job_state.update().where(c.job_id == job_id, *where).values(**values))
    finally:
        engine.dispose()


def pause(cfg: ScheduleConfig, job_id: str) -> None:
    """No more runs until resumed, across restarts too."""
    _set_state(cfg, job_id, {"paused": True})


def resume(cfg: ScheduleConfig, job_id: str) -> None:
    """Runs again from the next time on its grid (runs missed while paused are not made up)."""
    _set_state(cfg, job_id, {"paused": False, "next_run": None}, job_state.c.paused.is_(True))


def _configured(cfg: ScheduleConfig, job_id: str) -> JobConfig:
    for j in cfg.jobs:
        if j.id == job_id and j.enabled:
            return j
    known = ", ".join(j.id for j in cfg.jobs if j.enabled) or "none"
    raise ChampionError(
        f"JOB: '{job_id}' is not a job of this schedule config (jobs: {known}); give the config the "
        f"scheduler runs with --config."
    )


def run_now(cfg: ScheduleConfig, job_id: str, wait_seconds: float = 600.0) -> dict[str, Any]:
    """Run a job now: through the active scheduler when there is one (so it never runs twice at once),
    else in this process, as the given config defines it. Returns its run record."""
    url = cfg.url()
    before = max((r["id"] for r in job_history(url, job_id, limit=1)), default=0)
    lock = leader_lock(url)
    if lock.try_acquire():  # nobody is active: run it here, holding the lock so no scheduler starts meanwhile
        try:
            job = _configured(cfg, job_id)
            run_job(job_id, job.func, job.kwargs, url, how="run-now")
        finally:
            lock.release()
        return job_history(url, job_id, limit=1)[0]
    _set_state(cfg, job_id, {"run_requested": datetime.now(UTC)})
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        latest = job_history(url, job_id, limit=1)
        if latest and latest[0]["id"] > before and latest[0]["outcome"] != "running":
            return latest[0]
        time.sleep(0.5)
    raise ChampionError(
        f"JOB: '{job_id}' was handed to the active scheduler but did not finish in {wait_seconds:g} s."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
