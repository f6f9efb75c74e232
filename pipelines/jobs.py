"""Scheduled retraining: the jobs `champion schedule` runs by textual reference.

`retrain_on_drift` starts a retrain when the champion's performance alarm is on (a performance check,
`monitoring.store.PERFORMANCE_CHECKS`, fired in k of the last n judged windows; `alarm: any` or `checks`
opt in to input drift); `retrain_scheduled` starts one per cron slot. Both go through `launch`, which
checks the cooldown, claims the trigger's idempotency key (unique in `champion_retrains`: the same drift
episode or cron slot starts at most one retrain, across restarts and racing schedulers) and runs `champion
retrain` in a child process, so a crash or an OOM kill of the training cannot take the scheduler down; its
outcome is recorded either way.

A drift episode is a run of stored windows of one version during which the chosen alarm (k of the last n
judged windows counted toward it) stays on; its key is the id of the window that turned the alarm on. An
attempt that trained nothing (`skipped`: too few fresh labels) gives its key back, so the episode may try
again later.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from champion.errors import ChampionError
from monitoring.config import Checks
from monitoring.store import (
    ALARMS,
    ANY,
    INPUT,
    PERFORMANCE,
    PERFORMANCE_CHECKS,
    counts_toward,
    fired_checks,
    k_of_n,
)


def retrain_on_drift(
    model: str,
    config: str | None = None,
    monitor_config: str | None = None,
    checks: list[str] | None = None,
    alarm: str | None = None,
) -> dict[str, Any]:
    """Retrain `model` when its champion's performance alarm is on: k of the last n judged windows drifted
    on a performance check (`PERFORMANCE_CHECKS`: labelled accuracy, the label-free estimate, ...). Input
    drift alone has its own alarm and starts nothing unless asked: `alarm="any"` counts every drifted window
    (the behaviour before), `alarm="input"` the windows where an input check fired, `checks` (instead of
    `alarm`) the windows where one of the named checks fired."""
    from champion.config import drift_store_url, load_config
    from champion.registry import CHAMPION, connect, served_version
    from monitoring.config import MonitorConfig
    from monitoring.store import DriftStore

    chosen = retrain_alarm(alarm, checks)  # a bad choice is one sentence before anything is read
    monitor = load_config(MonitorConfig, monitor_config) if monitor_config else MonitorConfig()
    k, n = monitor.alarm.k, monitor.alarm.n
    reg = connect()
    try:
        version = served_version(reg, model, CHAMPION)
        if version is None:
            return {"started": False, "reason": f"model '{model}' has no champion to retrain."}
        store = DriftStore(drift_store_url(monitor.store_url))
        try:
            windows = store.history(model, version, limit=500, source="log")  # never a file checked ad hoc
        finally:
            store.close()
        episode = drift_episode(list(reversed(windows)), k, n, chosen.checks, chosen.alarm)
        if episode is None:
            return {"started": False, "alarm": chosen.label, "reason": f"no {chosen.name} alarm on "
                    f"v{version} ({k} of {n} judged windows that {chosen.what} needed)."}  # fmt: skip
        key = f"drift:{model}:v{version}:check-{episode['started_by']}"
        about = {
            "drift_check_id": episode["started_by"],
            "drift_checks_fired": ",".join(episode["fired"]),
            "drift_alarm": chosen.label,  # which alarm started it: the version's tag retrain.drift_alarm
        }
        fired = ", ".join(episode["fired"])
        news = (f"{chosen.name} alarm on v{version}: {k} of the last {n} judged windows {chosen.what} "
                f"(from window {episode['started_by']}; checks: {fired}).")  # fmt: skip
        return {**launch(reg, model, config, "drift", key, about, news), "alarm": chosen.label}
    finally:
        reg.close()


@dataclass(frozen=True)
class RetrainAlarm:
    """Which drifted windows start a retrain: those counting toward `alarm`, or where one of `checks` did."""

    alarm: str  # one of monitoring.store.ALARMS
    checks: tuple[str, ...] | None
    label: str  # recorded in the lineage: performance | input | any | checks:a,b
    name: str  # the alarm's name in the history: "performance alarm on v3: ..."
    what: str  # what a counted window did: "drifted on a performance check"


def retrain_alarm(alarm: str | None = None, checks: list[str] | None = None) -> RetrainAlarm:
    """The retrain trigger's alarm: the performance alarm unless `alarm` or `checks` says otherwise."""
    if alarm is not None and checks is not None:
        raise ChampionError("retrain_on_drift: give alarm or checks, not both; checks names its own alarm.")
    if checks is not None:
        known = {*Checks.model_fields, *PERFORMANCE_CHECKS}
        unknown = [c for c in checks if c not in known]
        if not checks or unknown:
            raise ChampionError(
                f"checks: {', '.join(unknown) or 'an empty list'} is no drift check; name some of "
                f"{', '.join(sorted(known))}."
            )
        return RetrainAlarm(ANY, tuple(checks), f"checks:{','.join(checks)}", "drift",
                            f"drifted on {' or '.join(checks)}")  # fmt: skip
    alarm = alarm or PERFORMANCE
    if alarm not in ALARMS:
        raise ChampionError(
            f"alarm: '{alarm}' is not one of {', '.join(ALARMS)}; performance (the default) retrains when "
            "accuracy moves, any also when only the inputs changed."
        )
    what = {PERFORMANCE: "drifted on a performance check", INPUT: "drifted on an input check", ANY: "drifted"}
    return RetrainAlarm(alarm, None, alarm, "drift" if alarm == ANY else alarm, what[alarm])


def retrain_scheduled(model: str, config: str | None = None, slot_minutes: float = 60) -> dict[str, Any]:
    """A retrain per schedule slot (the run time floored to `slot_minutes`): a catch-up run of the same
    slot after a restart finds its key taken and starts nothing."""
    from champion.registry import connect

    now = datetime.now(UTC)
    slot = int(now.timestamp() // (slot_minutes * 60) * slot_minutes * 60)
    key = f"schedule:{model}:{datetime.fromtimestamp(slot, UTC).isoformat(timespec='minutes')}"
    reg = connect()
    try:
        return launch(reg, model, config, "schedule", key, {})
    finally:
        reg.close()


def drift_episode(
    windows: list[dict], k: int, n: int, checks: Collection[str] | None = None, alarm: str = ANY
) -> dict | None:
    """The alarm episode the newest window is in, or None when the alarm is off.

    `windows`: stored drift decisions of one version, oldest first. A drifted window counts toward the
    alarm when it counts toward `alarm` (any drifted window by default; see `counts_toward`) or, given
    `checks`, when one of them fired. Returns the id of the window at which the alarm turned on (the
    episode's key) and the checks that fired in the counted windows of the episode."""
    judged = [w for w in windows if w["status"] in ("ok", "drift")]
    flags = []
    for w in judged:
        fired = fired_checks(w["checks"])
        if checks is not None:
            counts = w["status"] == "drift" and any(c in checks for c in fired)
        else:
            counts = counts_toward(alarm, w["status"], fired)
        flags.append((w["id"], counts, fired))
    drifted = [f[1] for f in flags]
    alarm_on = [k_of_n(drifted[: i + 1], k, n) for i in range(len(drifted))]  # the alarm after each window
    if not alarm_on or not alarm_on[-1]:
        return None
    start = len(alarm_on) - 1
    while start > 0 and alarm_on[start - 1]:
        start -= 1
    # The checks of the windows that made the alarm and kept it on.
    fired = sorted({name for _, counts, names in flags[max(0, start - n + 1) :] if counts for name in names})
    return {"started_by": flags[start][0], "fired": fired}


def launch(
    reg, model: str, config: str | None, trigger: str, key: str, about: dict[str, Any], news: str = ""
) -> dict:
    """Cooldown, then claim `key`, then `champion retrain` in a child process; the outcome is recorded.
    `news` (what triggered it) opens the story in the history, once per claimed key."""
    from champion.audit import LoopEvent
    from pipelines.lm_retrain import load_any_retrain_config
    from pipelines.retrain import AlreadyClaimed, start_attempt

    cfg = load_any_retrain_config(reg, model, config)
    waiting = cooldown_left(reg, model, cfg.triggers.cooldown_minutes)
    if waiting is not None:
        return {"started": False, "trigger_key": key, "reason": f"in cooldown after the last retrain until "
                f"{waiting.isoformat(timespec='minutes')}."}  # fmt: skip
    try:
        attempt = start_attempt(reg, model, trigger, key)
    except AlreadyClaimed as err:
        return {"started": False, "trigger_key": key, "reason": str(err)}
    if news:
        reg.audit.record(LoopEvent(model, trigger, news, None, about, trigger_key=key))
    command = [sys.executable, "-m", "champion_cli", "retrain", model, "--trigger-key", key,
               "--trigger", trigger, "--claimed", "--json"]  # fmt: skip
    if config:
        command += ["--config", config]
    for name, value in about.items():
        command += ["--about", f"{name}={value}"]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=cfg.triggers.timeout_minutes * 60
        )
    except subprocess.TimeoutExpired:
        _crashed(
            reg, attempt, f"the retrain ran past triggers.timeout_minutes ({cfg.triggers.timeout_minutes})."
        )
        return {"started": True, "trigger_key": key, "outcome": "timeout"}
    seconds = round(time.monotonic() - started, 1)
    try:
        out = proc.stdout
        result = json.loads(out[out.rfind("\n{\n") + 1 :] if not out.startswith("{\n") else out)
    except ValueError:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:500]
        _crashed(reg, attempt, f"the retrain process ended with exit code {proc.returncode}: {tail}")
        raise ChampionError(
            f"retrain of '{model}' ({key}) failed, exit code {proc.returncode}: {tail}"
        ) from None
    return {"started": True, "trigger_key": key, "outcome": result["outcome"], "reason": result["reason"],
            "challenger_version": result.get("challenger_version"), "seconds": seconds}  # fmt: skip


def cooldown_left(reg, model: str, minutes: float) -> datetime | None:
    """When the cooldown after the model's last retrain ends, if it has not yet (skipped attempts, which
    trained nothing, do not count)."""
    import sqlalchemy as sa

    from champion.audit import retrain_runs

    c = retrain_runs.c
    query = (
        sa.select(sa.func.max(c.started_at))
        .where(c.model_name == model, sa.or_(c.outcome.is_(None), c.outcome != "skipped"))
    )  # fmt: skip
    with reg.audit.engine.connect() as conn:
        last = conn.execute(query).scalar()
    if last is None:
        return None
    last = last if last.tzinfo else last.replace(tzinfo=UTC)
    until = last + timedelta(minutes=minutes)
    return until if until > datetime.now(UTC) else None


def _crashed(reg, attempt: int, detail: str) -> None:
    """The child died without recording an outcome (killed, OOM, timeout): record one for it."""
    import sqlalchemy as sa

    from champion.audit import retrain_runs
    from pipelines.retrain import finish_attempt

    with reg.audit.engine.connect() as conn:
        outcome = conn.execute(sa.select(retrain_runs.c.outcome).where(retrain_runs.c.id == attempt)).scalar()
    if outcome is None:
        finish_attempt(reg, attempt, "crashed", None, detail)
