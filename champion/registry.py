"""Registry operations on MLflow aliases: register, promote, roll back, list, history.

Aliases (`champion`, `challenger`) are the only deployment state; MLflow stages are never used.
Every alias move goes through `_move_alias`, which holds the audit lock, asks a small decision function,
then moves the alias and appends the event in one step. The audit history, not MLflow, says where an alias
is: a move made in the MLflow UI or API is served only once a person adopts it (`adopt`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from champion.audit import AliasEvent, AuditLog, LoopEvent, current_actor
from champion.config import artifact_root, audit_url, champion_home, prepare_environment, tracking_uri
from champion.errors import ChampionError
from champion.formats import SOURCE_TAG, VARIANT_TAG
from champion.repair import (
    REGISTRATION_TAG,
    Finding,
    crash_point,
    mirror_tags,
    name_filter,
    settle_model,
    settle_runs,
    version_label,
)
from champion.safety import DIGEST_TAG
from champion.signals import signals_deferred

_log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_METRIC = "val_macro_f1"
METRIC_TAG = "metric."  # version tags "metric.<name>" hold the numbers promotion compares
TASK_TAG = "task"  # what a version does; one registered before the tag existed is a classifier
TEXT_CLASSIFICATION, TEXT_GENERATION = "text-classification", "text-generation"
# A LoRA version (text-generation, format `lora`) names its base: the base's files digest, and the MLflow run
# whose artifacts under BASE_ARTIFACTS/ hold the base (logged once per digest by `champion sft`).
BASE_SHA_TAG, BASE_RUN_TAG, BASE_ARTIFACTS = "base_sha256", "base_run_id", "base"
# A text-generation version's system prompt: the service puts it first when a request has none.
SYSTEM_PROMPT_TAG = "system_prompt"


@dataclass(frozen=True)
class Decision:
    """The outcome of a promotion or rollback check, with the reason and the evidence behind it."""

    allowed: bool
    reason: str
    target_version: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    event_id: int | None = None


@dataclass
class Registry:
    """The two external systems a registry operation touches, injected so tests use real local ones."""

    client: Any  # mlflow.MlflowClient
    audit: AuditLog
    tracking_uri: str

    def close(self) -> None:
        self.audit.dispose()


def connect(tracking: str | None = None, audit: str | None = None) -> Registry:
    """Open the MLflow registry and the audit history (embedded sqlite under CHAMPION_HOME by default)."""
    prepare_environment()
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(tracking)
    if uri.startswith("sqlite:"):
        champion_home().mkdir(parents=True, exist_ok=True)
        artifact_root().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return Registry(MlflowClient(uri, uri), AuditLog(audit_url(audit)), uri)


# --- decisions: pure functions of what the registry and the history say ---------------------------


def _metric(tags: dict[str, str], metric: str) -> float | None:
    value = tags.get(METRIC_TAG + metric)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def decide_promotion(
    candidate: str,
    candidate_tags: dict[str, str],
    champion: str | None,
    champion_tags: dict[str, str],
    metric: str = DEFAULT_METRIC,
    force: bool = False,
) -> Decision:
    """Promote only a version at least as good as the champion on `metric`, unless forced."""
    if candidate_tags.get(VARIANT_TAG):
        return decide_variant_promotion(candidate, candidate_tags, champion, champion_tags, force)
    new, old = _metric(candidate_tags, metric), _metric(champion_tags, metric)
    evidence = {
        "metric": metric,
        "candidate": candidate,
        "candidate_value": new,
        "champion": champion,
        "champion_value": old,
        "forced": force,
        "candidate_data_sha256": candidate_tags.get("data_sha256"),
        "champion_data_sha256": champion_tags.get("data_sha256"),
    }
    if champion == candidate:
        return Decision(False, f"version {candidate} is already the champion.", evidence=evidence)
    if champion is None:
        return Decision(
            True, f"no current champion; version {candidate} becomes the first.", candidate, evidence
        )
    if force:
        return Decision(
            True, f"forced over champion v{champion} ({metric}: {old} -> {new}).", candidate, evidence
        )
    if new is None:
        return Decision(
            False,
            f"version {candidate} has no '{METRIC_TAG}{metric}' tag to compare; "
            "pass --force with a reason to promote it anyway.",
            evidence=evidence,
        )
    if old is not None and new < old:
        return Decision(
            False,
            f"version {candidate} {metric}={new:.4f} is worse than champion v{champion} "
            f"({old:.4f}); pass --force with a reason to promote it anyway.",
            evidence=evidence,
        )
    note = (
        ""
        if candidate_tags.get("data_sha256") == champion_tags.get("data_sha256")
        else " (measured on different validation data)"
    )
    reason = (
        f"version {candidate} {metric}={new:.4f} >= champion v{champion} "
        f"({'untagged' if old is None else f'{old:.4f}'}){note}."
    )
    return Decision(True, reason, candidate, evidence)


def decide_variant_promotion(
    candidate: str,
    candidate_tags: dict[str, str],
    champion: str | None,
    champion_tags: dict[str, str],
    force: bool = False,
) -> Decision:
    """A variant (student, int8, ONNX) replaces only its own source (or a sibling variant of it), and only
    within the quality budget its gate measured; `force` overrides both, audited."""
    kind, source = candidate_tags[VARIANT_TAG], candidate_tags.get(SOURCE_TAG)
    within = candidate_tags.get("gate.within_budget") == "true"
    family = champion_tags.get(SOURCE_TAG, champion) if champion else None
    evidence = {
        "candidate": candidate,
        "variant": kind,
        "source_version": source,
        "champion": champion,
        "champion_source": family,
        "within_budget": within,
        "gate_reason": candidate_tags.get("gate.reason"),
        "forced": force,
    }
    if champion == candidate:
        return Decision(False, f"version {candidate} is already the champion.", evidence=evidence)
    if not within and not force:
        why = candidate_tags.get("gate.reason", "it has no recorded variant gate verdict.")
        return Decision(
            False,
            f"version {candidate} is a {kind} variant of v{source} outside its quality budget: {why} "
            "Pass --force with a reason to promote it anyway.",
            evidence=evidence,
        )
    if champion is not None and family != source and not force:
        return Decision(
            False,
            f"version {candidate} is a {kind} variant of v{source}, but the champion is v{champion}"
            f"{'' if family == champion else f' (a variant of v{family})'}; a variant may replace only "
            f"its own source: build one from v{family}, or pass --force with a reason.",
            evidence=evidence,
        )
    verdict = "forced" if force and not within else "within its quality budget"
    detail = candidate_tags.get("gate.reason", "")
    return Decision(
        True,
        f"version {candidate} ({kind} of v{source}) is {verdict}: {detail}".strip(" :"),
        candidate,
        evidence,
    )


def champion_lineage(events: list[AliasEvent]) -> list[str | None]:
    """Replay the history into a stack of champions: a rollback pops, every other move pushes."""
    stack: list[str | None] = []
    for event in events:
        if event.action == "external":  # noticed, never decided: not a champion of the lineage
            continue
        if event.action == "rollback" and stack:
            stack.pop()
        else:
            stack.append(event.to_version)
    return stack


def decide_rollback(events: list[AliasEvent], current: str | None) -> Decision:
    lineage = champion_lineage(events)
    evidence = {"current": current, "lineage": lineage[-10:]}
    if current is None:
        return Decision(False, "there is no champion to roll back from.", evidence=evidence)
    if len(lineage) < 2 or lineage[-2] is None:
        return Decision(
            False,
            f"champion v{current} has no earlier champion in the history to return to.",
            evidence=evidence,
        )
    target = lineage[-2]
    return Decision(
        True, f"champion returns from v{current} to the previous champion v{target}.", target, evidence
    )


# --- alias moves ------------------------------------------------------------------------------------


def served_version(reg: Registry, name: str, alias: str) -> str | None:
    """The version `alias` names in the audit history: what servers serve and what drift checks, retrains,
    distillation and `champion predict` start from. A move made only in MLflow counts once it is adopted."""
    return reg.audit.aliases(name).get(alias)


def _alias_version(reg: Registry, name: str, alias: str) -> str | None:
    """Where MLflow's alias is now (only to compare with, or restore, what the audit history names)."""
    version = registered_model(reg, name).aliases.get(alias)
    return None if version is None else str(version)


def registered_model(reg: Registry, name: str):
    """MLflow's registered model `name`; an unknown name is a ChampionError that lists where to look."""
    from mlflow.exceptions import MlflowException

    try:
        return reg.client.get_registered_model(name)
    except MlflowException:
        raise ChampionError(
            f"model '{name}' is not in the registry at {reg.tracking_uri}; "
            "run `champion models list` to see the registered names."
        ) from None


def model_version(reg: Registry, name: str, version: str):
    """MLflow's version `version` of model `name`; an unknown model or version is a ChampionError."""
    from mlflow.exceptions import MlflowException

    registered_model(reg, name)
    try:
        return reg.client.get_model_version(name, str(version))
    except MlflowException:
        raise ChampionError(
            f"version '{version}' of model '{name}' does not exist; run `champion models show {name}`."
        ) from None


def _require_reason(reason: str) -> str:
    if not reason or not reason.strip():
        raise ChampionError("--reason: say why this alias change is made; the audit history records it.")
    return reason.strip()


def _move_alias(
    reg: Registry,
    name: str,
    alias: str,
    action: str,
    reason: str,
    decide: Callable[[str | None, list[AliasEvent]], Decision],
    actor: str | None = None,
    clear: tuple[str, ...] = (),
) -> Decision:
    """Move `alias` as `decide` says, audited; `clear` names aliases deleted in the same move.

    `decide` sees the version the audit history names (not MLflow's alias: a move made in the MLflow UI or
    API is not Champion's until a person adopts it, see `adopt`). Every alias that moves gets its intent row
    before MLflow changes, so after a crash the next holder of the lock settles each (champion/repair.py).
    """
    reason = _require_reason(reason)
    actor = actor or current_actor()
    with signals_deferred(), reg.audit.lock(name, alias) as history:
        settle_model(reg, name, history)  # what a killed process left, before anything new
        if history.fresh:
            settle_runs_quietly(reg)
        in_mlflow = {k: str(v) for k, v in registered_model(reg, name).aliases.items()}
        audited = reg.audit.aliases(name)
        for other, (was, now) in alias_disagreements(audited, in_mlflow).items():
            _log.warning(
                "'%s' of '%s' is on %s in MLflow but %s in the audit history (moved outside Champion); "
                "decided on the history. Adopt it with `champion adopt %s %s VERSION --reason ...`.",
                other, name, version_label(now), version_label(was), name, other,
            )  # fmt: skip
        current = audited.get(alias)
        decision = decide(current, history.events())
        if not decision.allowed:
            return decision
        target = decision.target_version
        checked = alias == CHAMPION or action == "adopt"  # what a server answers with: files checked first
        if checked and target is not None and (refusal := version_refusal(reg, name, target)):
            reg.audit.record(LoopEvent(name, "refused", refusal, target, {"action": action}, actor))
            return Decision(False, refusal, None, {"refused_version": target})
        moves = [(alias, current, target)] + [
            (other, audited.get(other), None)
            for other in clear
            if other != alias and (audited.get(other) or in_mlflow.get(other)) is not None
        ]
        evidence = {"decision": decision.reason, **decision.evidence}
        # The intents first: after a crash at any point below, the next holder of the lock settles them.
        intents = [
            history.append(AliasEvent(name, a, action, was, to, actor, reason, evidence), status="pending")
            for a, was, to in moves
        ]
        crash_point("alias:announced")
        try:
            for (a, _was, to), event in zip(moves, intents, strict=True):
                if to is None:
                    reg.client.delete_registered_model_alias(name, a)
                else:
                    reg.client.set_registered_model_alias(name, a, to)
                crash_point("alias:moved")
                mirror_tags(reg, event)
        except BaseException as err:
            for a, _was, _to in moves:
                _restore_alias(reg, name, a, in_mlflow.get(a), err)
            for event in intents:  # or the next operation finds them pending
                _settle_quietly(history, event.id, "aborted")
            raise
        for event in intents:
            history.settle(event.id, "done")
        crash_point("alias:done")
        return Decision(True, decision.reason, target, decision.evidence, intents[0].id)


def alias_disagreements(
    audited: dict[str, str], in_mlflow: dict[str, str]
) -> dict[str, tuple[str | None, str | None]]:
    """{alias: (audited version, MLflow's version)} for every alias on which MLflow and the history differ."""
    return {
        alias: (audited.get(alias), in_mlflow.get(alias))
        for alias in sorted(set(audited) | set(in_mlflow))
        if audited.get(alias) != in_mlflow.get(alias)
    }


def unaudited_aliases(reg: Registry, name: str) -> dict[str, tuple[str | None, str | None]]:
    """The model's aliases that MLflow shows elsewhere than the audit history (moved outside Champion)."""
    in_mlflow = {k: str(v) for k, v in registered_model(reg, name).aliases.items()}
    return alias_disagreements(reg.audit.aliases(name), in_mlflow)


def settle_runs_quietly(reg: Registry) -> None:
    """Mark runs whose process died FAILED; a registry operation never fails because of that sweep."""
    try:
        settle_runs(reg)
    except Exception as err:
        _log.warning("could not check for runs left RUNNING by dead processes: %s", err)


def _settle_quietly(history, event_id: int, status: str) -> None:
    try:
        history.settle(event_id, status)
    except Exception as err:
        _log.warning("could not mark audit row %s %s (the next operation will): %s", event_id, status, err)


def _restore_alias(reg: Registry, name: str, alias: str, version: str | None, err: BaseException) -> None:
    """Put `alias` back on `version` after a failed move; if that fails too, say on `err` what is left."""
    try:
        if version is None:
            reg.client.delete_registered_model_alias(name, alias)
        else:
            reg.client.set_registered_model_alias(name, alias, version)
        return
    except Exception as restore_err:
        problem = f"{type(restore_err).__name__}: {restore_err}"
    try:
        left = version_label(_alias_version(reg, name, alias))
    except Exception:
        left = "an unknown version (the registry did not answer)"
    note = (
        f"restoring alias '{alias}' of model '{name}' to {version_label(version)} failed as well "
        f"({problem}); "
        f"it is left on {left} with no audit record of the change; servers keep serving what the history "
        f"names. Check with `champion doctor {name}`."
    )
    err.add_note(note)
    _log.error(note)


# --- the operations the CLI and pipelines call -----------------------------------------------------


def assign_alias(
    reg: Registry,
    name: str,
    alias: str,
    version: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
    actor: str | None = None,
) -> Decision:
    """Point `alias` at `version` unconditionally (used for `challenger` after training)."""
    model_version(reg, name, version)
    version = str(version)

    def decide(current: str | None, _events: list[AliasEvent]) -> Decision:
        if current == version:
            return Decision(False, f"'{alias}' already points at v{version}.", evidence=evidence or {})
        return Decision(True, f"'{alias}' moves to v{version}.", version, evidence or {})

    return _move_alias(reg, name, alias, "assign", reason, decide, actor)


def promote(
    reg: Registry,
    name: str,
    version: str,
    reason: str,
    force: bool = False,
    metric: str = DEFAULT_METRIC,
    actor: str | None = None,
) -> Decision:
    """Point `champion` at `version` if it is at least as good as the current champion (or forced)."""
    candidate = model_version(reg, name, version)
    version = str(candidate.version)

    def decide(current: str | None, _events: list[AliasEvent]) -> Decision:
        champion_tags = dict(reg.client.get_model_version(name, current).tags) if current else {}
        return decide_promotion(version, dict(candidate.tags), current, champion_tags, metric, force)

    return _move_alias(reg, name, CHAMPION, "promote", reason, decide, actor)


def decide_gate_promotion(
    version: str, compared_with: str | None, current: str | None, gate_reason: str, evidence: dict[str, Any]
) -> Decision:
    """Act on a passed gate only if the champion is still the version the gate compared against."""
    evidence = {**evidence, "gate_champion": compared_with, "champion_at_move": current}
    if current != compared_with:
        return Decision(
            False,
            f"the champion moved from {version_label(compared_with)} to {version_label(current)} after "
            "the gate compared "
            f"v{version} with it; the verdict is void, so nothing moved (retrain or compare again).",
            evidence=evidence,
        )
    return Decision(True, f"v{version} {gate_reason}", version, evidence)


def promote_on_gate(
    reg: Registry,
    name: str,
    version: str,
    compared_with: str | None,
    gate_reason: str,
    evidence: dict[str, Any],
    reason: str,
    actor: str | None = None,
) -> Decision:
    """Point `champion` at `version`, which passed the champion/challenger gate against `compared_with`."""
    model_version(reg, name, version)

    def decide(current: str | None, _events: list[AliasEvent]) -> Decision:
        return decide_gate_promotion(str(version), compared_with, current, gate_reason, evidence)

    return _move_alias(reg, name, CHAMPION, "gate_promote", reason, decide, actor)


def assign_challenger_on_gate(
    reg: Registry,
    name: str,
    version: str,
    compared_with: str | None,
    gate_reason: str,
    evidence: dict[str, Any],
    reason: str,
    actor: str | None = None,
) -> Decision:
    """Make `version` the canary's challenger, if the champion is still the one the gate compared it with."""
    model_version(reg, name, version)
    version = str(version)

    def decide(current: str | None, _events: list[AliasEvent]) -> Decision:
        champion_now = reg.audit.aliases(name).get(CHAMPION)
        verdict = decide_gate_promotion(version, compared_with, champion_now, gate_reason, evidence)
        if not verdict.allowed:
            return verdict
        if current == version:
            return Decision(False, f"'{CHALLENGER}' already points at v{version}.", evidence=verdict.evidence)
        return Decision(True, f"'{CHALLENGER}' moves to v{version}.", version, verdict.evidence)

    return _move_alias(reg, name, CHALLENGER, "assign", reason, decide, actor)


def rollback(reg: Registry, name: str, reason: str, actor: str | None = None) -> Decision:
    """Return `champion` to the champion before the current one, as the history records it."""
    registered_model(reg, name)

    def decide(current: str | None, events: list[AliasEvent]) -> Decision:
        decision = decide_rollback(events, current)
        if decision.allowed:
            model_version(reg, name, decision.target_version)  # deleted since? say so, not fail later
        return decision

    return _move_alias(reg, name, CHAMPION, "rollback", reason, decide, actor)


def decide_canary_outcome(
    promote_it: bool,
    champion: str,
    challenger: str,
    current_champion: str | None,
    current_challenger: str | None,
    reason: str,
    evidence: dict[str, Any],
) -> Decision:
    """Act on a canary verdict only if the aliases are still the pair the canary measured."""
    evidence = {**evidence, "canary_champion": champion, "canary_challenger": challenger}
    if current_champion != champion or current_challenger != challenger:
        return Decision(
            False,
            f"the aliases moved while the canary ran (champion {version_label(current_champion)}, "
            f"challenger {version_label(current_challenger)}); its verdict on v{challenger} is void.",
            evidence=evidence,
        )
    return Decision(True, reason, challenger if promote_it else None, evidence)


def conclude_canary(
    reg: Registry,
    name: str,
    champion: str,
    challenger: str,
    promote_it: bool,
    reason: str,
    evidence: dict[str, Any],
    actor: str | None = None,
) -> Decision:
    """Record a canary verdict: promote the challenger to champion and retire `challenger` in the same
    audited move (so nobody sees champion v2 / challenger v2), or retire it alone (delete `challenger`).

    Several server workers may reach a verdict at once; the audit lock makes the first one win and the
    others find the aliases moved.
    """
    actor = actor or f"canary@{current_actor()}"
    other = CHALLENGER if promote_it else CHAMPION

    def decide(current: str | None, _events: list[AliasEvent]) -> Decision:
        pair = (current, reg.audit.aliases(name).get(other))
        if not promote_it:
            pair = pair[::-1]
        return decide_canary_outcome(promote_it, champion, challenger, *pair, reason, evidence)

    if promote_it:
        return _move_alias(reg, name, CHAMPION, "canary_promote", reason, decide, actor, clear=(CHALLENGER,))
    return _move_alias(reg, name, CHALLENGER, "canary_rollback", reason, decide, actor)


def promote_after_canary(
    reg: Registry,
    name: str,
    version: str,
    compared_with: str | None,
    gate_reason: str,
    evidence: dict[str, Any],
    reason: str,
    actor: str | None = None,
) -> Decision:
    """An approved canary verdict (`approval: required`): the canary's promotion, made by the approver."""
    return conclude_canary(reg, name, str(compared_with), str(version), True, reason, evidence, actor)


def adopt(
    reg: Registry, name: str, alias: str, version: str | None, reason: str, actor: str | None = None
) -> Decision:
    """Make an alias move done outside Champion (MLflow UI or API) a person's audited move, so servers
    follow it: `version` must be where MLflow's alias is now (None: the alias was deleted there). The
    version's files are checked like any promotion's."""
    if version is not None:
        version = str(model_version(reg, name, version).version)

    def decide(current: str | None, _events: list[AliasEvent]) -> Decision:
        in_mlflow = _alias_version(reg, name, alias)
        evidence = {"audited": current, "in_mlflow": in_mlflow}
        if in_mlflow != version:
            return Decision(
                False,
                f"'{alias}' of '{name}' is on {version_label(in_mlflow)} in MLflow, not "
                f"{version_label(version)}; adopt the "
                f"version the outside move set (see `champion doctor {name}`).",
                evidence=evidence,
            )
        if current == version:
            return Decision(
                False,
                f"'{alias}' on {version_label(version)} is in the audit history already: nothing to adopt.",
                evidence=evidence,
            )  # fmt: skip
        return Decision(
            True,
            f"'{alias}' was moved to {version_label(version)} outside Champion (the history had "
            f"{version_label(current)}): adopted.",
            version,
            evidence,
        )

    return _move_alias(reg, name, alias, "adopt", reason, decide, actor)


def register_version(
    reg: Registry,
    name: str,
    model_uri: str,
    tags: dict[str, str],
    alias: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
) -> str:
    """Register `model_uri` as a new version of `name` with its tags, and point `alias` at it.

    Either all of it happens or none: a failure or a Ctrl-C part-way deletes the new version again, and
    after a kill the next registry operation on the model does (the registration row announces it).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    actor = current_actor()
    with signals_deferred(), reg.audit.lock(name, alias) as history:
        settle_model(reg, name, history)
        if history.fresh:
            settle_runs_quietly(reg)
        try:
            reg.client.get_registered_model(name)
            created_model = False
        except MlflowException:
            created_model = True
        digest = _checked_digest(model_uri, tags, f"the model at {model_uri}")
        registration = history.begin_registration(alias, model_uri, created_model, actor)
        crash_point("register:announced")
        tags = {
            TASK_TAG: TEXT_CLASSIFICATION,
            **tags,
            REGISTRATION_TAG: str(registration),
            DIGEST_TAG: digest,
        }
        mv = mlflow.register_model(model_uri, name, tags=tags, await_registration_for=300)
        version = str(mv.version)
        crash_point("register:registered")
        try:
            assign_alias(reg, name, alias, version, reason, evidence, actor)
        except BaseException as err:
            _unregister(reg, name, version, created_model, err)
            history.end_registration(registration, "rolled_back", version, f"failed: {err}"[:2000])
            raise
        history.end_registration(registration, "done", version)
    return version


@contextmanager
def _model_files(uri: str, prefix: str) -> Iterator[str]:
    """The files at `uri` in a temporary folder, removed afterwards."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield mlflow.artifacts.download_artifacts(uri, dst_path=tmp)


def _checked_digest(model_uri: str, tags: dict[str, str], where: str) -> str:
    """Check the files at `model_uri` are safe to load and return their digest, recorded with the version."""
    from champion.formats import format_of
    from champion.safety import check_files, files_digest

    with _model_files(model_uri, "champion-register-") as folder:
        check_files(folder, format_of(tags), where)
        return files_digest(folder)


def version_refusal(reg: Registry, name: str, version: str) -> str | None:
    """Why `version` may not become champion (unsafe files or flavour, files changed), or None."""
    from champion.formats import format_of
    from champion.safety import UnsafeModelError, check_version_folder

    mv = model_version(reg, name, version)
    tags = dict(mv.tags)
    try:
        with _model_files(f"models:/{name}/{version}", "champion-check-") as folder:
            check_version_folder(folder, format_of(tags), tags, f"v{version} of '{name}'")
    except (UnsafeModelError, ChampionError) as err:
        return str(err)
    except Exception as err:  # no files at all, a store that does not answer
        return f"the files of v{version} of '{name}' could not be read to check them ({err})."
    return None


def _unregister(reg: Registry, name: str, version: str, created_model: bool, err: BaseException) -> None:
    """Delete what `register_version` made; if that fails, say on `err` what is left in the registry."""
    try:
        if created_model:
            reg.client.delete_registered_model(name)
        else:
            reg.client.delete_model_version(name, version)
        return
    except Exception as delete_err:
        problem = f"{type(delete_err).__name__}: {delete_err}"
    what = f"model '{name}' with its only version v{version}" if created_model else f"'{name}' v{version}"
    note = (
        f"deleting the half-registered {what} failed as well ({problem}); it is left in the registry "
        f"without the alias; delete it with MlflowClient().delete_model_version('{name}', '{version}')."
    )
    err.add_note(note)
    _log.error(note)


def history(reg: Registry, name: str) -> list[AliasEvent]:
    registered_model(reg, name)
    return reg.audit.events(name)


def story(reg: Registry, name: str) -> list[dict[str, Any]]:
    """Alias moves and the loop's other steps (drift, retrain, gate) in time order, as plain dicts.

    Every entry has `type` (alias | loop), `action` (for loop steps: their kind), `at`, `actor` and
    `reason` (for loop steps: their summary); alias entries keep all of their fields."""
    entries = [(e.at, {"type": "alias", **e.__dict__, "at": e.at.isoformat()}) for e in history(reg, name)]
    for e in reg.audit.loop_events(name):
        step = {
            "type": "loop",
            "id": e.id,
            "action": e.kind,
            "version": e.version,
            "at": e.at.isoformat(),
            "actor": e.actor,
            "reason": e.summary,
            "evidence": e.evidence,
            "trigger_key": e.trigger_key,
        }
        entries.append((e.at, step))
    return [entry for _, entry in sorted(entries, key=lambda pair: pair[0])]


def list_models(reg: Registry) -> list[dict[str, Any]]:
    out = []
    for model in reg.client.search_registered_models(order_by=["name ASC"]):
        try:
            query = name_filter(model.name)
        except ChampionError:  # a name MLflow's search cannot quote: listed, without its latest version
            query = None
        versions = query and reg.client.search_model_versions(
            query, order_by=["version_number DESC"], max_results=1
        )
        out.append(
            {
                "name": model.name,
                "aliases": {k: str(v) for k, v in model.aliases.items()},
                "latest": str(versions[0].version) if versions else None,
                "updated": _ms_to_iso(model.last_updated_timestamp),
            }
        )
    return out


def show_model(reg: Registry, name: str) -> dict[str, Any]:
    model = registered_model(reg, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():  # search results carry no aliases (sqlite store)
        by_version.setdefault(str(version), []).append(alias)
    versions = []
    for mv in reg.client.search_model_versions(name_filter(name), order_by=["version_number DESC"]):
        versions.append(
            {
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "created": _ms_to_iso(mv.creation_timestamp),
                "run_id": mv.run_id,
                "status": mv.status,
                "tags": dict(mv.tags),
            }
        )
    in_mlflow = {k: str(v) for k, v in model.aliases.items()}
    return {
        "name": name,
        "aliases": in_mlflow,
        "unaudited": {
            alias: {"audited": was, "in_mlflow": now}
            for alias, (was, now) in alias_disagreements(reg.audit.aliases(name), in_mlflow).items()
        },
        "description": model.description,
        "versions": versions,
    }


def _ms_to_iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


# --- `champion doctor` -----------------------------------------------------------------------------


def doctor(reg: Registry, name: str | None = None, fix: bool = False) -> list[Finding]:
    """What killed processes left, for one model or all; with `fix`, settled as the next operation would."""
    names = (
        [name]
        if name
        else sorted({m["name"] for m in list_models(reg)} | set(reg.audit.models_with_pending()))
    )
    found: list[Finding] = []
    for model in names:
        with reg.audit.lock(model) as history:
            found += settle_model(reg, model, history, fix)
            found += _unaudited(reg, model)
    return found + settle_runs(reg, fix)


def _unaudited(reg: Registry, name: str) -> list[Finding]:
    """Aliases moved outside Champion: reported, never fixed here (adopting one is a person's decision)."""
    try:
        disagreements = unaudited_aliases(reg, name)
    except ChampionError:  # not in MLflow (a pending registration rolled back, or deleted there)
        return []
    found = []
    for alias, (audited, in_mlflow) in disagreements.items():
        mlflow_has, history_has = version_label(in_mlflow), version_label(audited)
        subject = f"'{alias}' is on {mlflow_has} in MLflow, {history_has} in the audit history"
        adopt = f"`champion adopt {name} {alias} {in_mlflow or 'none'} --reason ...`"
        action = (
            f"moved outside Champion: servers keep serving {history_has}; a person adopts the move with "
            f"{adopt}, or sets the alias back in MLflow."
        )
        found.append(Finding(name, "unaudited_alias", subject, action, False))
    return found
