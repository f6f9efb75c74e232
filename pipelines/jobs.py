"""Scheduled retraining: the jobs `champion schedule` runs by textual reference.

`retrain_on_drift` starts a retrain when the champion's drift alarm is on; `retrain_scheduled` starts one
per cron slot. Both go through `launch`, which checks the cooldown, claims the trigger's idempotency key
(unique in `champion_retrains`: the same drift episode or cron slot starts at most one retrain, across
restarts and racing schedulers) and runs `champion retrain` in a child process, so a crash or an OOM kill
of the training cannot take the scheduler down; its outcome is recorded either way.

A drift episode is a run of stored windows of one version during which the alarm (k of the last n judged
windows drifted) stays on; its key is the id of the window that turned the alarm on. An attempt that
trained nothing (`skipped`: too few fresh labels) gives its key back, so the episode may try again later.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from champion.errors import ChampionError
from monitoring.store import k_of_n


def retrain_on_drift(
    model: str,
    config: str | None = None,
    monitor_config: str | None = None,
    checks: list[str] | None = None,
) -> dict[str, Any]:
    """Retrain `model` if its champion's drift alarm is on. `checks`: only windows where one of these
    checks fired count (e.g. ["concept", "estimated_accuracy"] for a performance-based trigger)."""
    from champion.config import drift_store_url, load_config
    from champion.registry import CHAMPION, connect, served_version
    from monitoring.config import MonitorConfig
    from monitoring.store import DriftStore

    monitor = load_config(MonitorConfig, monitor_config) if monitor_config else MonitorConfig()
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
        episode = drift_episode(list(reversed(windows)), monitor.alarm.k, monitor.alarm.n, checks)
        if episode is None:
            return {"started": False, "reason": f"no drift alarm on v{version} ({monitor.alarm.k} of "
                    f"{monitor.alarm.n} judged windows needed)."}  # fmt: skip
        key = f"drift:{model}:v{version}:check-{episode['started_by']}"
        about = {"drift_check_id": episode["started_by"], "drift_checks_fired": ",".join(episode["fired"])}
        fired = ", ".join(episode["fired"])
        news = (f"drift alarm on v{version}: {monitor.alarm.k} of the last {monitor.alarm.n} judged windows "
                f"drifted (from window {episode['started_by']}; checks: {fired}).")  # fmt: skip
        return launch(reg, model, config, "drift", key, about, news)
    finally:
        reg.close()


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


def drift_episode(windows: list[dict], k: int, n: int, checks: list[str] | None = None) -> dict | None:
    """The alarm episode the newest window is in, or None when the alarm is off.

    `windows`: stored drift decisions of one version, oldest first. Returns the id of the window at which
    the alarm turned on (the episode's key) and the checks that fired during the episode."""
    judged = [w for w in windows if w["status"] in ("ok", "drift")]
    flags = []
    for w in judged:
        fired = [c["name"] for c in w["checks"] if c.get("drifted")]
        counts = w["status"] == "drift" and (checks is None or any(c in checks for c in fired))
        flags.append((w["id"], bool(counts), fired))
    drifted = [f[1] for f in flags]
    alarm = [k_of_n(drifted[: i + 1], k, n) for i in range(len(drifted))]  # the alarm after each window
    if not alarm or not alarm[-1]:
        return None
    start = len(alarm) - 1
    while start > 0 and alarm[start - 1]:
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
    from pipelines.retrain import AlreadyClaimed, load_retrain_config, start_attempt

    cfg = load_retrain_config(config, name=model)
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
