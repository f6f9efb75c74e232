"""Every drift decision and check result, kept beside the inference log (sqlite, or PostgreSQL by URL).

The alarm has memory: `alarm_state` says whether at least k of the last n stored windows of a version
drifted (`k_of_n`, the one alarm rule, which the drift-triggered retrain applies too), so one odd hour does
not launch a retrain. Only windows of the inference log count (`source` "log"): a check of a file someone
brings (`champion drift --file what-if.csv`) is stored, marked "file", and never moves the alarm, a retrain
or the served version's gauges.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from champion.db import create_tables, engine_for
from monitoring.drift import DRIFT, DriftDecision

LOG, FILE = "log", "file"  # a window of the inference log (what production saw) | a file checked ad hoc
SOURCES = (LOG, FILE)

_metadata = sa.MetaData()
drift_checks = sa.Table(
    "drift_checks",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("window", sa.Text, nullable=False),  # JSON: how the window was chosen, bounds, sampling
    sa.Column("checks", sa.Text, nullable=False),  # JSON: every check with its statistic and threshold
    sa.Column("report_run_id", sa.String(64)),  # the MLflow run holding the Evidently report
    sa.Column("source", sa.String(16), nullable=False, server_default=LOG),  # log | file
)


@dataclass(frozen=True)
class AlarmState:
    alarm: bool
    drifted: int  # of the last `considered` windows
    considered: int
    k: int
    n: int

    @property
    def reason(self) -> str:
        verdict = "alarm" if self.alarm else "no alarm"
        return (
            f"{verdict}: {self.drifted} of the last {self.considered} judged windows drifted "
            f"(alarm at {self.k} of {self.n})."
        )


class DriftStore:
    def __init__(self, url: str):
        self.engine = engine_for(url)
        create_tables(self.engine, _metadata, upgrade=_add_source_column)

    def close(self) -> None:
        self.engine.dispose()

    def record(self, decision: DriftDecision, report_run_id: str | None = None, source: str = LOG) -> int:
        """Store a decision; `source` says what was checked: "log" (a window of the inference log) or
        "file" (a file brought to `champion drift --file`, which never counts toward the alarm)."""
        if source not in SOURCES:
            raise ValueError(f"source: {source!r} is not one of {', '.join(SOURCES)}")
        data = decision.to_dict()
        row = {
            "at": datetime.fromisoformat(decision.at).astimezone(UTC),
            "model_name": decision.model,
            "model_version": decision.version,
            "status": decision.status,
            "rows": decision.rows,
            "reason": decision.reason,
            "window": json.dumps(data["window"], default=str, sort_keys=True),
            "checks": json.dumps(data["checks"], default=str),
            "report_run_id": report_run_id,
            "source": source,
        }
        with self.engine.begin() as conn:
            return int(conn.execute(drift_checks.insert().values(**row)).inserted_primary_key[0])

    def history(
        self, model: str, version: str | None = None, limit: int = 100, source: str | None = None
    ) -> list[dict]:
        """The newest stored checks first; `source="log"` keeps only windows of the inference log."""
        c = drift_checks.c
        query = sa.select(drift_checks).where(c.model_name == model).order_by(c.id.desc()).limit(limit)
        if version is not None:
            query = query.where(c.model_version == str(version))
        if source is not None:
            query = query.where(c.source == source)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for r in rows:
            r["window"], r["checks"] = json.loads(r["window"]), json.loads(r["checks"])
        return rows

    def alarm_state(self, model: str, version: str, k: int, n: int) -> AlarmState:
        """Whether at least `k` of the last `n` judged windows of the inference log drifted (insufficient
        windows and checks of files do not count)."""
        c = drift_checks.c
        query = (
            sa.select(c.status)
            .where(
                c.model_name == model,
                c.model_version == str(version),
                c.status.in_([DRIFT, "ok"]),
                c.source == LOG,
            )
            .order_by(c.id.desc())
            .limit(n)
        )
        with self.engine.connect() as conn:
            drifted = [r[0] == DRIFT for r in conn.execute(query)][::-1]  # oldest first
        return AlarmState(k_of_n(drifted, k, n), sum(drifted), len(drifted), k, n)


def k_of_n(drifted: Sequence[bool], k: int, n: int) -> bool:
    """The alarm rule: at least `k` of the last `n` judged windows drifted (`drifted`: oldest first)."""
    return sum(drifted[-n:]) >= k


def _add_source_column(conn: sa.Connection) -> None:
    """Tables made before `source` existed get it; their rows were all windows of the log."""
    if "source" not in {col["name"] for col in sa.inspect(conn).get_columns(drift_checks.name)}:
        column = f"source VARCHAR(16) NOT NULL DEFAULT '{LOG}'"
        conn.execute(sa.text(f"ALTER TABLE {drift_checks.name} ADD COLUMN {column}"))
