"""Prometheus gauges of the drift checks and the scheduler, served by the scheduler process on /metrics."""

from __future__ import annotations

from contextlib import suppress
from functools import cache
from types import SimpleNamespace

STATUS_CODE = {"ok": 0, "drift": 1, "insufficient_data": 2}


@cache
def metrics() -> SimpleNamespace:
    """Created on first use (not at import): a process that never monitors registers nothing."""
    from prometheus_client import Counter, Gauge

    return SimpleNamespace(
        status=Gauge(
            "champion_drift_status",
            "Last drift decision: 0 ok, 1 drift, 2 insufficient data",
            ["model", "version"],
        ),
        value=Gauge(
            "champion_drift_value", "Last value of each drift statistic", ["model", "version", "check"]
        ),
        threshold=Gauge(
            "champion_drift_threshold",
            "Calibrated threshold of each drift statistic",
            ["model", "version", "check"],
        ),
        drifted=Gauge(
            "champion_drift_check_drifted", "1 when the check fired", ["model", "version", "check"]
        ),
        estimated_accuracy=Gauge(
            "champion_estimated_accuracy",
            "Expected accuracy from calibrated confidence",
            ["model", "version"],
        ),
        # kind: performance (what retrains by default), input (the inputs changed), any (the drift state);
        # `max by (model, version)` over the kinds is the single alarm of earlier releases.
        alarm=Gauge(
            "champion_drift_alarm",
            "1 while k of the last n judged windows drifted on a check of this kind",
            ["model", "version", "kind"],
        ),
        rows=Gauge("champion_drift_window_rows", "Rows in the last checked window", ["model", "version"]),
        job_runs=Counter("champion_job_runs", "Scheduled job runs by outcome", ["job", "outcome"]),
        job_last_success=Gauge(
            "champion_job_last_success_timestamp_seconds", "When each job last succeeded", ["job"]
        ),
        job_last_duration=Gauge("champion_job_last_duration_seconds", "How long each job last ran", ["job"]),
        leader=Gauge("champion_scheduler_leader", "1 while this process is the active scheduler"),
        pending=Gauge("champion_pending_approvals", "Promotions waiting for a person's approval", ["model"]),
        pending_oldest=Gauge(
            "champion_pending_approval_oldest_timestamp_seconds",
            "When the oldest promotion still waiting for approval was asked for (absent: none waits)",
            ["model"],
        ),
    )


def observe_drift(run) -> None:
    m, d = metrics(), run.decision
    m.status.labels(d.model, d.version).set(STATUS_CODE[d.status])
    m.rows.labels(d.model, d.version).set(d.rows)
    for c in d.checks:
        if c.value is not None:
            m.value.labels(d.model, d.version, c.name).set(c.value)
        if c.threshold is not None:
            m.threshold.labels(d.model, d.version, c.name).set(c.threshold)
        m.drifted.labels(d.model, d.version, c.name).set(1 if c.drifted else 0)
        if c.name == "estimated_accuracy" and "estimated_accuracy" in c.details:
            m.estimated_accuracy.labels(d.model, d.version).set(c.details["estimated_accuracy"])
    for kind, state in run.alarms.items():
        m.alarm.labels(d.model, d.version, kind).set(1 if state.alarm else 0)


def observe_pending(waiting, now: float) -> None:
    """Publish the pending promotions per model; a model whose queue emptied drops its oldest-time series."""
    m = metrics()
    oldest: dict[str, float] = {}
    counts: dict[str, int] = {}
    for item in waiting:
        at = item.requested_at.timestamp()
        oldest[item.model_name] = min(oldest.get(item.model_name, now), at)
        counts[item.model_name] = counts.get(item.model_name, 0) + 1
    known = {labels[0] for labels in _series(m.pending)}
    for model in known | set(counts):
        m.pending.labels(model).set(counts.get(model, 0))
        if model in oldest:
            m.pending_oldest.labels(model).set(oldest[model])
        else:
            with suppress(KeyError):  # never set
                m.pending_oldest.remove(model)


def _series(gauge) -> list[tuple[str, ...]]:
    return [tuple(s.labels.values()) for metric in gauge.collect() for s in metric.samples]
