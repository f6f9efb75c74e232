"""Every drift decision and check result, kept beside the inference log (sqlite, or PostgreSQL by URL).

The alarm has memory: `alarm_state` says whether at least k of the last n stored windows of a version
drifted (`k_of_n`, the one alarm rule, which the drift-triggered retrain applies too), so one odd hour does
not launch a retrain. There are three alarms, one per `ALARMS` kind, each over the same judged windows:
`performance` counts the windows where a performance check fired (`PERFORMANCE_CHECKS`: labelled accuracy,
the label-free estimate, for generative models the valid-JSON rate and the answers' log-probability; what
starts a retrain by default), `input` the windows where any other check fired (the inputs changed: an
alert, not a reason to retrain by itself), `any` every drifted window (the drift state). Only windows of the
inference log count (`source` "log"): a check of a file someone brings (`champion drift --file
what-if.csv`) is stored, marked "file", and never moves an alarm, a retrain or the served version's gauges.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from champion.db import create_tables, engine_for
from monitoring.drift import DRIFT, DriftDecision

# The checks that say the model performs worse, not only that its inputs changed: labelled accuracy
# (`concept`), the label-free estimate (`estimated_accuracy`), and for generative models the valid-JSON
# rate (`valid_json`) and the answers' mean log-probability (`answer_logprob`).
PERFORMANCE_CHECKS = ("concept", "estimated_accuracy", "valid_json", "answer_logprob")
PERFORMANCE, INPUT, ANY = "performance", "input", "any"
ALARMS = (PERFORMANCE, INPUT, ANY)  # which fired checks a drifted window must have to count

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
    drifted: int  # of the last `considered` windows, those that count toward this alarm
    considered: int
    k: int
    n: int
    kind: str = ANY  # one of ALARMS

    @property
    def reason(self) -> str:
        if self.kind == ANY:  # the drift state, in the words it always had
            verdict = "alarm" if self.alarm else "no alarm"
            return (
                f"{verdict}: {self.drifted} of the last {self.considered} judged windows drifted "
                f"(alarm at {self.k} of {self.n})."
            )
        state, article = "on" if self.alarm else "off", "an" if self.kind == INPUT else "a"
        return (
            f"{self.kind} alarm {state}: {self.drifted} of the last {self.considered} judged windows "
            f"drifted on {article} {self.kind} check (alarm at {self.k} of {self.n})."
        )


def counts_toward(alarm: str, status: str, fired: Iterable[str]) -> bool:
    """Whether a window judged `status` whose checks `fired` counts toward `alarm` (one of ALARMS)."""
    if alarm not in ALARMS:
        raise ValueError(f"alarm: {alarm!r} is not one of {', '.join(ALARMS)}")
    if status != DRIFT:
        return False
    fired = set(fired)
    if alarm == PERFORMANCE:
        return bool(fired & set(PERFORMANCE_CHECKS))
    if alarm == INPUT:
        return bool(fired - set(PERFORMANCE_CHECKS))
    return True


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

    def alarm_state(self, model: str, version: str, k: int, n: int, kind: str = ANY) -> AlarmState:
        """Whether at least `k` of the last `n` judged windows of the inference log count toward the alarm
        `kind` (see `counts_toward`; insufficient windows and checks of files are not judged windows)."""
        return self.alarm_states(model, version, k, n, (kind,))[kind]

    def alarm_states(
        self, model: str, version: str, k: int, n: int, kinds: Sequence[str] = ALARMS
    ) -> dict[str, AlarmState]:
        """Every alarm of `kinds` over the same last `n` judged windows of the inference log."""
        c = drift_checks.c
        query = (
            sa.select(c.status, c.checks)
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
            windows = [(r[0], fired_checks(json.loads(r[1]))) for r in conn.execute(query)][
                ::-1
            ]  # oldest 1st
        states = {}
        for kind in kinds:
            counted = [counts_toward(kind, status, fired) for status, fired in windows]
            states[kind] = AlarmState(k_of_n(counted, k, n), sum(counted), len(counted), k, n, kind)
        return states


def fired_checks(checks: list[dict]) -> list[str]:
    """The names of the checks that fired, from a stored window's `checks`."""
    return [c["name"] for c in checks if c.get("drifted")]


def k_of_n(drifted: Sequence[bool], k: int, n: int) -> bool:
    """The alarm rule: at least `k` of the last `n` judged windows drifted (`drifted`: oldest first)."""
    return sum(drifted[-n:]) >= k


def _add_source_column(conn: sa.Connection) -> None:
    """Tables made before `source` existed get it; their rows were all windows of the log."""
    if "source" not in {col["name"] for col in sa.inspect(conn).get_columns(drift_checks.name)}:
        column = f"source VARCHAR(16) NOT NULL DEFAULT '{LOG}'"
        conn.execute(sa.text(f"ALTER TABLE {drift_checks.name} ADD COLUMN {column}"))
