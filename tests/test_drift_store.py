"""The drift store keeps checks of files apart: only windows of the inference log move the alarm
(sqlite, and PostgreSQL where marked)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from monitoring.drift import CheckResult, DriftDecision
from monitoring.store import DriftStore, drift_checks


def _decision(status: str, version: str = "1") -> DriftDecision:
    check = CheckResult("prediction", "jensen_shannon", 0.3, 0.1, status == "drift", 500, status, "x.")
    return DriftDecision(status, "m", version, 500, [check])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, home) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'inference.db'}"


def test_file_checks_never_count_toward_the_alarm(url):
    store = DriftStore(url)
    for status in ("ok", "drift"):
        store.record(_decision(status))
    before = store.alarm_state("m", "1", 2, 3)
    for _ in range(3):
        store.record(_decision("drift"), source="file")
    assert store.alarm_state("m", "1", 2, 3) == before  # same alarm, drifted, considered
    assert (before.alarm, before.drifted, before.considered) == (False, 1, 2)
    assert [r["source"] for r in store.history("m")] == ["file"] * 3 + ["log"] * 2
    assert [r["status"] for r in store.history("m", source="log")] == ["drift", "ok"]
    assert len(store.history("m", "1", limit=2, source="file")) == 2
    with pytest.raises(ValueError, match="source: 'what-if' is not one of log, file"):
        store.record(_decision("ok"), source="what-if")
    store.close()


def test_a_table_made_before_the_source_column_gets_it_and_its_rows_count_as_log(url):
    old = sa.Table("drift_checks", sa.MetaData(), *[c._copy() for c in drift_checks.c if c.name != "source"])
    engine = sa.create_engine(url)
    old.metadata.create_all(engine)
    row = {
        "model_name": "m",
        "model_version": "1",
        "rows": 500,
        "reason": "x.",
        "window": "{}",
        "checks": "[]",
    }
    with engine.begin() as conn:
        conn.execute(
            old.insert(), [{**row, "at": datetime.now(UTC), "status": s} for s in ("drift", "drift")]
        )
    engine.dispose()
    store = DriftStore(url)
    assert [r["source"] for r in store.history("m")] == ["log", "log"]
    assert store.alarm_state("m", "1", 2, 3).alarm
    store.record(_decision("ok"), source="file")
    assert store.alarm_state("m", "1", 2, 3).considered == 2
    store.close()
    DriftStore(url).close()  # opening it again changes nothing
