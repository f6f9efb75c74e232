"""The functions scheduled jobs call, by textual reference (`monitoring.jobs:drift_check`).

Each takes only plain values (APScheduler pickles the arguments into its job store) and returns a small
JSON-able summary that the run record keeps.
"""

from __future__ import annotations

from typing import Any


def drift_check(
    model: str,
    config: str | None = None,
    last: int | None = None,
    window_minutes: float | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """One drift check of the served version (`champion drift`), its gauges set for /metrics."""
    from datetime import UTC, datetime, timedelta

    from champion.config import load_config
    from monitoring.config import MonitorConfig
    from monitoring.job import drift
    from monitoring.metrics import observe_drift

    cfg = load_config(MonitorConfig, config, []) if config else MonitorConfig()
    since = datetime.now(UTC) - timedelta(minutes=window_minutes) if window_minutes else None
    run = drift(model, cfg, version=version, last=last, since=since)
    observe_drift(run)
    return {
        "status": run.decision.status,
        "version": run.decision.version,
        "rows": run.decision.rows,
        "fired": [c.name for c in run.decision.fired],
        "alarm": None if run.alarm is None else run.alarm.alarm,
        "reason": run.decision.reason,
    }
