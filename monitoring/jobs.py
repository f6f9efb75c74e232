"""The functions scheduled jobs call, by textual reference (`monitoring.jobs:drift_check`).

Each takes only plain values (the arguments come from the schedule config) and returns a small
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
    from monitoring.check import drift
    from monitoring.config import MonitorConfig
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
        "alarms": {kind: state.alarm for kind, state in run.alarms.items()},  # performance, input, any
        "reason": run.decision.reason,
    }


def review_select(model: str, config: str | None = None, log_url: str | None = None) -> dict[str, Any]:
    """Queue the newly logged predictions that deserve a person's label (`champion review select`)."""
    from champion.config import load_config
    from monitoring.review import ReviewConfig, ReviewQueue

    cfg = load_config(ReviewConfig, config, []) if config else ReviewConfig()
    queue = ReviewQueue(log_url)
    try:
        return queue.select(model, cfg).__dict__
    finally:
        queue.close()


def approvals(model: str | None = None) -> dict[str, Any]:
    """Expire pending promotions past their time (audited) and publish what still waits, for the alert
    on approvals older than a day."""
    import time

    from champion.approval import expire, pending_promotions
    from champion.registry import connect
    from monitoring.metrics import observe_pending

    reg = connect()
    try:
        expired = expire(reg, model)
        waiting = pending_promotions(reg, model)
    finally:
        reg.close()
    observe_pending(waiting, time.time())
    return {
        "expired": [f"{p.model_name} v{p.version}" for p in expired],
        "waiting": [f"{p.model_name} v{p.version}" for p in waiting],
    }
