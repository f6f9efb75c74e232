"""Every store creates its tables under one lock: two processes opening a store on an empty database at
the same moment both succeed (sqlite, and PostgreSQL where marked)."""

from __future__ import annotations

import multiprocessing
import os
import traceback
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from champion.approval import pending_promotions, pending_table
from champion.audit import AuditLog, alias_events
from monitoring.review import ReviewQueue, review_items
from monitoring.scheduler import job_history, job_runs
from monitoring.store import DriftStore, drift_checks
from serving.inference_log import InferenceLog, predictions

ROUNDS = 4  # races per store and database; one round seldom makes an unlocked creation collide


def _audit(url: str, spool: Path) -> None:
    AuditLog(url).dispose()


def _approval(url: str, spool: Path) -> None:
    audit = AuditLog(url)
    pending_promotions(SimpleNamespace(audit=audit), "m")
    audit.dispose()


def _inference_log(url: str, spool: Path) -> None:
    InferenceLog(url, spool_dir=spool).engine.dispose()


def _drift_store(url: str, spool: Path) -> None:
    DriftStore(url).close()


def _review(url: str, spool: Path) -> None:
    ReviewQueue(url).close()


def _scheduler(url: str, spool: Path) -> None:
    job_history(url)


STORES = {  # how each store is opened, and a table it must have made
    "audit": (_audit, alias_events),
    "approval": (_approval, pending_table),
    "inference_log": (_inference_log, predictions),
    "drift_store": (_drift_store, drift_checks),
    "review": (_review, review_items),
    "scheduler": (_scheduler, job_runs),
}


def _child(open_store, url: str, spool: Path, start, errors: Path) -> None:
    try:
        start.wait(timeout=30)
        open_store(url, spool)
        code = 0
    except BaseException:
        errors.write_text(traceback.format_exc())
        code = 1
    os._exit(code)  # no finalizers: the parent's inherited connections stay untouched


def _race(store: str, url: str, folder: Path) -> list[str]:
    """Open `store` on `url` in two processes released together; the tracebacks of those that failed."""
    open_store, table = STORES[store]
    ctx = multiprocessing.get_context("fork")  # both start from this process's imports: they run at once
    start = ctx.Barrier(2)
    errors = [folder / f"child-{i}.err" for i in range(2)]
    children = [
        ctx.Process(target=_child, args=(open_store, url, folder / f"spool-{i}", start, errors[i]))
        for i in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    failures = [e.read_text() for e in errors if e.exists()]
    failures += [f"exit code {c.exitcode}" for c in children if c.exitcode and not failures]
    if not failures:
        engine = sa.create_engine(url)
        try:
            assert sa.inspect(engine).has_table(table.name), f"{store}: no {table.name} table was made"
        finally:
            engine.dispose()
    return failures


@pytest.mark.parametrize("store", sorted(STORES))
def test_two_processes_create_a_stores_tables_at_once_on_sqlite(store, home, tmp_path):
    for i in range(ROUNDS):
        folder = tmp_path / f"round-{i}"
        folder.mkdir()
        failures = _race(store, f"sqlite:///{folder / 'store.db'}", folder)
        assert not failures, f"{store}, round {i}: {failures[0]}"


@pytest.mark.postgres
@pytest.mark.parametrize("store", sorted(STORES))
def test_two_processes_create_a_stores_tables_at_once_on_postgres(store, home, tmp_path, pg_server):
    import psycopg2

    admin = psycopg2.connect(pg_server.admin_dsn(), connect_timeout=5)
    admin.autocommit = True
    try:
        for i in range(ROUNDS):
            name = f"champion_test_{uuid.uuid4().hex[:10]}"
            with admin.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
            folder = tmp_path / f"round-{i}"
            folder.mkdir()
            try:
                failures = _race(store, pg_server.url(name), folder)
            finally:
                with admin.cursor() as cur:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            assert not failures, f"{store}, round {i}: {failures[0]}"
    finally:
        admin.close()
