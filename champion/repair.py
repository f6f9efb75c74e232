"""Settle what a killed process left half-done in the registry: called first by every registry operation
(under the model's lock) and by `champion doctor` (`registry.doctor`).

What can be left, and what is done about it:
- an alias move announced (a pending audit row) but never marked done: if MLflow shows the alias on the
  announced version the move happened and the row is marked done, otherwise it is marked aborted;
- a registration announced but never closed: the version it created (found by its `champion.registration`
  tag) is deleted, because its process died before the version had its alias and everything after it;
- an MLflow run still RUNNING whose process (on this host) is gone: marked FAILED with the reason.
`champion doctor` also reports aliases moved outside Champion (MLflow disagrees with the audit history);
those are never fixed here: a person adopts one with `champion adopt`.

A pending row can only be a dead process's: a live writer holds the lock while its row is pending.
Crash points (`CHAMPION_CRASH_AT=name[#n]`) let tests kill a process at each of these steps.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from champion.errors import ChampionError

if TYPE_CHECKING:
    from champion.audit import AliasEvent, LockedHistory
    from champion.registry import Registry

log = logging.getLogger(__name__)

CRASH_ENV = "CHAMPION_CRASH_AT"
REGISTRATION_TAG = "champion.registration"  # the version tag naming the registration row that made it
PID_TAG, HOST_TAG, STARTED_TAG = "champion.pid", "champion.host", "champion.started"
_crash_counts: dict[str, int] = {}


@dataclass(frozen=True)
class Finding:
    """One thing a killed process left: what it is, and what was (or would be) done about it."""

    model: str | None
    kind: str  # alias_intent | registration | running_run | unaudited_alias
    subject: str
    action: str  # one sentence
    fixed: bool


def crash_point(name: str) -> None:
    """Kill this process here with SIGKILL when CHAMPION_CRASH_AT names this point (tests only).

    `name#n` kills at the n-th time the point is reached (1-based), e.g. after some training steps.
    """
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def process_tags() -> dict[str, str]:
    """Tags for an MLflow run that let a later process tell whether the one running it is still alive."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(), STARTED_TAG: f"{time.time():.3f}"}


def process_alive(pid: int, started: float | None = None) -> bool:
    """Is `pid` on this host alive, and (given when the run started) not a later process reusing the pid?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    if started is None:
        return True
    born = _process_start_time(pid)
    return born is None or born <= started + 5.0  # a process born after the run began is not its owner


def _process_start_time(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime), counted after the command name
        with open("/proc/stat") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# --- MLflow helpers the registry shares (here, below it, so settling needs nothing from it) ------


def version_label(version: str | None) -> str:
    """`v3`, or `no version` for None: how messages name a version that may be absent."""
    return "no version" if version is None else f"v{version}"


def name_filter(name: str) -> str:
    """An MLflow search filter for the versions of model `name`, quoted so a `'` in it cannot end the string.

    MLflow's filter strings know no escapes: a name with `'` is quoted with `"` and the other way round."""
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    raise ChampionError(
        f"model {name!r} has both kinds of quote in its name, which MLflow's search cannot express; "
        "register it under a name without one of them."
    )


def mirror_tags(reg: Registry, event: AliasEvent) -> None:
    """Copy the audit event onto the version tags, so the MLflow UI shows who moved the alias and why."""
    at = event.at.isoformat(timespec="seconds")
    if event.to_version is not None:
        for key, value in {
            "event_id": event.id,
            "action": event.action,
            "by": event.actor,
            "at": at,
            "reason": event.reason[:4000],
            "from_version": event.from_version,
        }.items():
            reg.client.set_model_version_tag(
                event.model_name, event.to_version, f"audit.{event.alias}.{key}", str(value)
            )
    if event.from_version is not None:
        reg.client.set_model_version_tag(
            event.model_name,
            event.from_version,
            f"audit.{event.alias}.replaced",
            f"{at} by {version_label(event.to_version)}",
        )


# --- settling under the model's lock ---------------------------------------------------------------


def settle_model(reg: Registry, name: str, history: LockedHistory, fix: bool = True) -> list[Finding]:
    """Settle the model's pending alias moves and registrations; call with the lock freshly taken."""
    if not history.fresh:
        return []  # the outer holder settled already; pending rows now are its own
    return _settle_alias_intents(reg, name, history, fix) + _settle_registrations(reg, name, history, fix)


def _settle_alias_intents(reg: Registry, name: str, history: LockedHistory, fix: bool) -> list[Finding]:
    found = []
    pending = history.pending()
    if not pending:
        return found
    aliases = _aliases(reg, name)
    for event in pending:
        happened = aliases.get(event.alias) == event.to_version
        moved = f"{version_label(event.from_version)} -> {version_label(event.to_version)}"
        subject = f"'{event.alias}' {moved} (audit row {event.id})"
        if happened:
            action = (
                f"the alias is on {version_label(event.to_version)}, so the move happened: the row by "
                f"{event.actor} is marked done."
            )
        else:
            action = (
                f"the alias is not on {version_label(event.to_version)}, so the move did not happen: "
                "marked aborted."
            )
        if fix:
            if happened:
                try:
                    mirror_tags(reg, event)
                except Exception as err:  # cosmetic: the audit row is what counts
                    log.warning("could not copy audit row %s onto the version tags: %s", event.id, err)
            history.settle(event.id, "done" if happened else "aborted")
        found.append(Finding(name, "alias_intent", subject, action, fix))
    return found


def _settle_registrations(reg: Registry, name: str, history: LockedHistory, fix: bool) -> list[Finding]:
    found = []
    for row in history.pending_registrations():
        versions = _versions_of_registration(reg, name, row["id"])
        subject = f"registration {row['id']} of {row['model_uri']} by {row['actor']}"
        moved = {e.to_version for e in history.events(row["alias"])} & set(versions)
        if moved:  # only closing the row was missing: the version and its audited alias move are there
            (version,) = moved
            action = (
                f"v{version} was registered and its '{row['alias']}' alias move recorded: closed as done."
            )
            if fix:
                history.end_registration(row["id"], "done", version, action)
            found.append(Finding(name, "registration", subject, action, fix))
            continue
        if versions:
            listed = ", ".join(f"v{v}" for v in versions)
            action = (
                f"its process died after registering {listed} and before the version got its "
                f"'{row['alias']}' alias: {listed} deleted."
            )
        else:
            action = "its process died before any version was registered: closed as rolled back."
        if fix:
            for version in versions:
                reg.client.delete_model_version(name, version)
            if row["created_model"] and versions and not _has_versions(reg, name):
                reg.client.delete_registered_model(name)
            history.end_registration(row["id"], "rolled_back", ",".join(versions) or None, action)
        found.append(Finding(name, "registration", subject, action, fix))
    return found


def _aliases(reg: Registry, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        model = reg.client.get_registered_model(name)
    except MlflowException:
        return {}
    return {alias: str(v) for alias, v in model.aliases.items()}


def _versions_of_registration(reg: Registry, name: str, registration_id: int) -> list[str]:
    from mlflow.exceptions import MlflowException

    try:
        versions = reg.client.search_model_versions(name_filter(name))
    except MlflowException:
        return []
    return sorted(
        (str(mv.version) for mv in versions if (mv.tags or {}).get(REGISTRATION_TAG) == str(registration_id)),
        key=int,
    )


def _has_versions(reg: Registry, name: str) -> bool:
    return bool(reg.client.search_model_versions(name_filter(name), max_results=1))


# --- runs left RUNNING -----------------------------------------------------------------------------


def settle_runs(reg: Registry, fix: bool = True) -> list[Finding]:
    """Mark FAILED the RUNNING runs whose process on this host is gone (other hosts' runs are left)."""
    found = []
    for run in _running_runs(reg):
        tags = run.data.tags
        if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
            continue
        pid = int(tags[PID_TAG])
        started = float(tags[STARTED_TAG]) if STARTED_TAG in tags else None
        if process_alive(pid, started):
            continue
        name = run.info.run_name or run.info.run_id
        action = f"its process {pid} on {tags[HOST_TAG]} is gone: marked FAILED."
        if fix:
            reg.client.set_tag(
                run.info.run_id, "champion.failure", f"process {pid} died while the run was RUNNING"
            )
            reg.client.set_terminated(run.info.run_id, "FAILED")
        found.append(Finding(None, "running_run", f"run {name} ({run.info.run_id})", action, fix))
    return found


def _running_runs(reg: Registry) -> list[Any]:
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in reg.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return []
    return list(reg.client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000))
