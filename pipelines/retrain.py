"""Retrain the champion on its original data plus fresh labels, and let the gate decide.

Reads top to bottom: the champion and its recorded config -> the rows it was trained on, rebuilt from its
lineage and checked against the recorded hashes -> fresh labelled rows, split into fresh-train and a fresh
holdout -> fine-tune (from the champion's weights or the base) -> register as `candidate`, with the rows it
added to its source's split -> the gate on the fresh holdout against the champion of the moment -> promote
directly, or hand it to the running service's canary as `challenger`.

    cfg = load_config(RetrainConfig, "configs/retrain.yaml")
    result = retrain(cfg)                      # or: champion retrain support-intents --config ...

A failure or Ctrl-C before registration leaves nothing registered and the champion untouched (fine-tuning
guarantees it); every attempt is recorded (`champion_retrains`) with its outcome, and every step is in
`champion history`.
"""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import yaml
from pydantic import Field

from champion.config import StrictModel, apply_overrides, parse_config
from champion.errors import ChampionError, InterruptedRun
from champion.gate import GateConfig, GateDecision
from champion.tables import content_sha256
from pipelines.data import (
    EXTRA_ROWS_ARTIFACT,
    EXTRA_ROWS_TAG,
    DataConfig,
    extra_rows_text,
    load_splits,
    training_data,
    without_extra_rows,
)
from pipelines.fresh import FreshConfig

CANDIDATE = "candidate"  # the alias a retrained version waits under until the gate has spoken


class Triggers(StrictModel):
    cooldown_minutes: float = Field(1440, ge=0)  # after any retrain, scheduled triggers wait this long
    timeout_minutes: float = Field(180, gt=0)  # a scheduled retrain's process is stopped after this


class RetrainConfig(StrictModel):
    model_name: str = Field("support-intents", min_length=1)
    init: Literal["champion", "base"] = "champion"  # start from the champion's weights, or from its base
    method: Literal["lora", "full"] | None = None  # None: the champion's own method
    overrides: list[str] = Field(default_factory=list)  # on the champion's config, e.g. "train.epochs=2"
    # Replaces the champion's recorded training rows (its file and the fresh rows it learnt from); without it
    # they must be unchanged.
    data: str | None = None
    fresh: FreshConfig = FreshConfig()
    gate: GateConfig = GateConfig()
    promotion: Literal["direct", "canary", "none"] = "direct"  # none: register and gate, move nothing
    # required: a gate pass waits for a person (champion approve / reject, or the console); it expires after
    # approval_hours, and the person who approves must not be the one who asked (the scheduler, say).
    approval: Literal["none", "required"] = "none"
    approval_hours: float = Field(72.0, gt=0, le=24 * 90)
    experiment: str = "champion-retrain"
    triggers: Triggers = Triggers()


@dataclass
class RetrainResult:
    outcome: str  # promoted | canary | pending | refused | not_promoted | skipped
    reason: str  # one sentence
    champion_version: str
    challenger_version: str | None = None
    gate: GateDecision | None = None
    run_id: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)


def retrain(
    cfg: RetrainConfig,
    registry=None,
    *,
    trigger: str = "manual",
    trigger_key: str | None = None,
    about: dict[str, Any] | None = None,
    claimed: bool = False,
) -> RetrainResult:
    """One retrain attempt, recorded under `trigger_key` (unique: a key already used is refused, unless
    `claimed`: the scheduler that launched this process claimed it already)."""
    from champion.registry import connect, registered_model

    reg = registry or connect()
    name = cfg.model_name
    registered_model(reg, name)  # clear sentences for an unknown model or a missing file, before any record
    for i, path in enumerate(cfg.fresh.files):
        if not os.path.isfile(path):
            raise ChampionError(
                f"fresh.files[{i}]: '{path}' does not exist; list labelled CSV, JSONL or Parquet files."
            )
    return run_attempt(reg, name, trigger, trigger_key, about, claimed,
                       lambda key: _retrain(cfg, reg, trigger, key, about or {}))  # fmt: skip


def run_attempt(reg, name: str, trigger: str, trigger_key: str | None, about: dict[str, Any] | None,
                claimed: bool, body) -> RetrainResult:  # fmt: skip
    """Record a retrain attempt under `trigger_key` (a new key, unless `claimed`), run `body(trigger_key)`,
    and record how it ended, however it ends (an exception or Ctrl-C included)."""
    trigger_key = trigger_key or f"manual:{name}:{datetime.now(UTC).isoformat()}:{os.getpid()}"
    attempt = claimed_attempt(reg, trigger_key) if claimed else start_attempt(reg, name, trigger, trigger_key)
    started = {"trigger": trigger, **(about or {})}
    record_event(reg, name, "retrain_started", f"retrain started ({trigger}).", None, started, trigger_key)

    def finish(outcome: str, version: str | None, detail: str, evidence: dict[str, Any]) -> None:
        finish_attempt(reg, attempt, outcome, version, detail)
        record_event(reg, name, "retrain_finished", detail, version, {"outcome": outcome, **evidence},
                     trigger_key)  # fmt: skip

    try:
        result = body(trigger_key)
    except (KeyboardInterrupt, InterruptedRun):
        finish("interrupted", None, "retrain interrupted before the gate; nothing was promoted.", {})
        raise
    except Exception as err:
        finish("failed", None, f"retrain failed: {type(err).__name__}: {err}"[:2000], {})
        raise
    finish(result.outcome, result.challenger_version, result.reason, result.counts)
    return result


def _retrain(cfg: RetrainConfig, reg, trigger: str, trigger_key: str, about: dict[str, Any]) -> RetrainResult:
    import pandas as pd

    from champion.registry import CHAMPION, served_version
    from pipelines.compare import compare
    from pipelines.finetune import finetune
    from pipelines.fresh import fresh_data, normalise, require_disjoint

    name = cfg.model_name
    champion = served_version(reg, name, CHAMPION)
    if champion is None:
        raise ChampionError(f"model '{name}' has no champion to retrain; promote a version first.")

    # The champion's recipe and the rows it was trained on, exactly as recorded (or an explicit replacement):
    # what its source splits into, and the fresh rows its own retrain added to the training split.
    ft_cfg, recorded = champion_recipe(reg, name, champion, cfg)
    original, learnt = without_extra_rows(recorded)

    # Fresh labels: what the retrain may learn from, and the holdout it never trains on.
    fresh = fresh_data(name, cfg.fresh, exclude_texts=recorded.train["text"])
    counts = dict(fresh.counts)
    if len(fresh.train) < cfg.fresh.min_train_rows:
        return RetrainResult(
            "skipped",
            f"{len(fresh.train)} fresh labelled rows to learn from, fewer than fresh.min_train_rows "
            f"({cfg.fresh.min_train_rows}); nothing was trained.",
            champion,
            counts=counts,
        )
    if len(fresh.holdout) < cfg.gate.min_rows:
        return RetrainResult(
            "skipped",
            f"the fresh holdout has {len(fresh.holdout)} rows, fewer than gate.min_rows "
            f"({cfg.gate.min_rows}) the gate needs; nothing was trained (collect more feedback labels).",
            champion,
            counts=counts,
        )

    # What the champion learnt from fresh rows stays, unless a fresh row of the same text replaces it (the
    # inference log keeps every label, so the rows it learnt from the log come back as fresh rows).
    kept = learnt[~learnt["text"].map(normalise).isin(set(fresh.train["text"].map(normalise)))]
    extra = pd.concat([kept, *[fresh.train[["text", "label"]]] * cfg.fresh.repeat], ignore_index=True)
    extra = extra.astype(str)
    counts["champion_fresh_rows_kept"] = len(kept)

    # Fine-tune on original + kept + fresh-train rows, registered as `candidate` (never straight to
    # challenger: a running canary would start serving it before the gate has spoken).
    lineage = {
        "retrain.parent_version": champion,
        "retrain.trigger": trigger,
        "retrain.trigger_key": trigger_key[:250],
        "retrain.init": cfg.init,
        "retrain.fresh_train_rows": str(len(fresh.train)),
        "retrain.fresh_repeat": str(cfg.fresh.repeat),
        "retrain.fresh_holdout_rows": str(len(fresh.holdout)),
        "retrain.fresh_holdout_sha256": fresh.holdout_sha256,
        "retrain.kept_rows": str(len(kept)),
        EXTRA_ROWS_TAG: content_sha256(extra),  # the rows added to the source's split, kept in the run
        **{f"retrain.{k}": str(v)[:250] for k, v in about.items()},
    }
    init_model = _checked_download(reg, name, champion) if cfg.init == "champion" else None
    trained = finetune(
        ft_cfg,
        registry=reg,
        splits=original,  # the rows whose hash was just checked, not a second read of the file
        extra_train=extra,
        init_model=init_model,
        tags=lineage,
        reason=f"retrained from v{champion} ({trigger}) on {len(fresh.train)} fresh rows",
        # In the run before the version registers: with the recorded config they rebuild its training data.
        texts={EXTRA_ROWS_ARTIFACT: extra_rows_text(extra)},
    )
    version = trained.version
    counts["challenger_labels_new"] = sorted(set(fresh.train["label"]) - set(recorded.labels))

    # The gate, against the champion of this moment (it may have moved while we trained).
    require_disjoint(fresh.holdout, [*original.train["text"], *extra["text"]])
    now_champion = served_version(reg, name, CHAMPION)
    if now_champion is None:
        raise ChampionError(f"model '{name}' lost its champion while the retrain ran; nothing was promoted.")
    note = {} if now_champion == champion else {"champion_changed_during_retrain": [champion, now_champion]}
    comparison = compare(
        reg,
        name,
        now_champion,
        version,
        fresh.holdout,
        cfg.gate,
        trigger=trigger,
        trigger_key=trigger_key,
        parent_version=champion,
        **note,
    )
    decision = comparison.decision
    tag_gate(reg, name, version, decision)
    record_event(
        reg,
        name,
        "gate",
        f"gate on v{version} against v{now_champion}: {decision.reason}",
        version,
        decision.evidence,
        trigger_key,
    )
    if not decision.promote:
        return RetrainResult(
            "refused",
            f"v{version} {decision.reason}",
            now_champion,
            version,
            decision,
            trained.run_id,
            counts,
        )
    evidence = {"gate": gate_summary(decision), "trigger_key": trigger_key}
    return hand_over(reg, name, version, now_champion, decision, evidence, cfg.promotion, cfg.approval,
                     cfg.approval_hours, trigger, trained.run_id, counts)  # fmt: skip


def hand_over(
    reg,
    name: str,
    version: str,
    now_champion: str,
    decision: GateDecision,
    evidence: dict[str, Any],
    promotion: str,
    approval: str,
    approval_hours: float,
    trigger: str,
    run_id: str | None,
    counts: dict[str, Any],
) -> RetrainResult:
    """After a passing gate: nothing (`promotion: none`), a pending approval, the canary's challenger alias,
    or the champion alias, each audited with the gate's `evidence`."""
    from champion.registry import CHALLENGER, assign_alias, promote_on_gate

    if promotion == "none":
        return RetrainResult(
            "not_promoted",
            f"v{version} passed the gate; promotion is off (promotion: none).",
            now_champion,
            version,
            decision,
            run_id,
            counts,
        )
    if approval == "required":
        from champion.approval import request_approval

        item = request_approval(
            reg, name, version, promotion, now_champion, decision.reason, evidence, approval_hours
        )
        why = (
            f"v{version} passed the gate and waits for approval until {item.expires_at:%Y-%m-%d %H:%M} "
            f'UTC: champion approve {name} {version} --reason "..." (or reject).'
        )
        return RetrainResult("pending", why, now_champion, version, decision, run_id, counts)
    if promotion == "canary":
        moved = assign_alias(
            reg,
            name,
            CHALLENGER,
            version,
            evidence=evidence,
            reason=f"passed the gate against v{now_champion}; the canary decides",
        )
        outcome, why = (
            "canary",
            f"v{version} passed the gate and is the canary's challenger: {decision.reason}",
        )
    else:
        moved = promote_on_gate(
            reg,
            name,
            version,
            now_champion,
            decision.reason,
            evidence,
            reason=f"retrained ({trigger}); passed the gate on the fresh holdout",
        )
        outcome, why = "promoted", f"v{version} is the champion: {decision.reason}"
    if not moved.allowed:
        return RetrainResult("not_promoted", moved.reason, now_champion, version, decision, run_id, counts)
    return RetrainResult(outcome, why, now_champion, version, decision, run_id, counts)


def champion_recipe(reg, name: str, version: str, cfg: RetrainConfig, purpose: str = "retrain"):
    """The version's fine-tuning config (from its MLflow run) with the retrain's changes, and the rows it was
    trained on, rebuilt from its lineage and checked against the hashes recorded with it (`training_data`);
    with `cfg.data`, what that file splits into instead. A version retrained before its fresh rows were
    recorded gives what its source alone splits into, as it did then."""
    import mlflow

    from pipelines.finetune import FinetuneConfig

    mv = reg.client.get_model_version(name, version)
    try:
        text = mlflow.artifacts.load_text(f"runs:/{mv.run_id}/config.yaml")
    except Exception:
        raise ChampionError(
            f"v{version} of '{name}' has no recorded config.yaml in its run (registered outside Champion?); "
            f"{purpose} needs its recipe, so fine-tune one with `champion finetune` instead."
        ) from None
    data = yaml.safe_load(text) or {}
    recorded_data = copy.deepcopy(data.get("data"))
    if cfg.method is not None:
        data["method"] = cfg.method
    data.setdefault("registry", {})
    data["registry"].update(
        {"model_name": name, "alias": CANDIDATE, "experiment": cfg.experiment, "tracking_uri": None}
    )
    if cfg.data is not None:
        data.setdefault("data", {})["source"] = cfg.data
    data = apply_overrides(data, list(cfg.overrides))
    ft_cfg = parse_config(FinetuneConfig, data, source=f"v{version}'s config with the retrain's changes")
    if cfg.data is not None:
        return ft_cfg, load_splits(ft_cfg.data)
    trained_on = parse_config(DataConfig, recorded_data or {}, source=f"v{version}'s recorded data")
    changed = [k for k in DataConfig.model_fields if getattr(ft_cfg.data, k) != getattr(trained_on, k)]
    if changed:
        raise ChampionError(
            f"overrides: data.{changed[0]} changes the rows v{version} was trained on, which {purpose} "
            "reuses as recorded; pass --data FILE to split another file as the overrides say."
        )
    return ft_cfg, training_data(reg, name, version, unrecorded="source")


def _checked_download(reg, name: str, version: str) -> str:
    """The champion's files, checked as the service checks them before they are loaded (allowlist, contents,
    recorded digest)."""
    from serving.model import checked_folder

    return str(checked_folder(reg.client, name, version)[0])


def gate_summary(decision: GateDecision) -> dict[str, Any]:
    ev = decision.evidence
    keys = (
        "rows",
        "holdout_sha256",
        "champion",
        "challenger",
        "macro_f1_delta",
        "macro_f1_delta_interval",
        "accuracy_delta",
        "accuracy_delta_interval",
        "mcnemar",
        "mlflow_run_id",
        "champion_version",
    )
    return {"promote": decision.promote, "reason": decision.reason, **{k: ev[k] for k in keys if k in ev}}


def tag_gate(reg, name: str, version: str, decision: GateDecision) -> None:
    """The gate's verdict and its numbers on the challenger's version tags (the MLflow UI shows them)."""
    ev = decision.evidence
    tags = {
        "gate.promote": str(decision.promote).lower(),
        "gate.reason": decision.reason[:4000],
        "gate.holdout_sha256": ev.get("holdout_sha256", ""),
        "gate.rows": str(ev.get("rows")),
        "gate.champion_version": str(ev.get("champion_version")),
    }
    if "macro_f1_delta" in ev:
        low, high = ev["macro_f1_delta_interval"]
        tags.update(
            {
                "gate.macro_f1_delta": f"{ev['macro_f1_delta']:.6f}",
                "gate.macro_f1_delta_low": f"{low:.6f}",
                "gate.macro_f1_delta_high": f"{high:.6f}",
                "gate.mcnemar_p": f"{ev['mcnemar']['p_value']:.6g}",
                "gate.mlflow_run_id": str(ev.get("mlflow_run_id")),
            }
        )
    for key, value in tags.items():
        reg.client.set_model_version_tag(name, version, key, value)


def record_event(reg, name, kind, summary, version, evidence, trigger_key) -> None:
    from champion.audit import LoopEvent

    reg.audit.record(LoopEvent(name, kind, summary, version, evidence, trigger_key=trigger_key))


# --- attempts: one row per trigger key -------------------------------------------------------------------


def start_attempt(reg, name: str, trigger: str, trigger_key: str) -> int:
    """Claim `trigger_key`; a key already claimed (by this or any other process) is refused."""
    import sqlalchemy as sa

    from champion.audit import retrain_runs

    row = {
        "model_name": name,
        "trigger_key": trigger_key,
        "trigger": trigger,
        "started_at": datetime.now(UTC),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    try:
        with reg.audit.engine.begin() as conn:
            return int(conn.execute(retrain_runs.insert().values(**row)).inserted_primary_key[0])
    except sa.exc.IntegrityError:
        raise AlreadyClaimed(
            f"trigger '{trigger_key}' has already started a retrain; one trigger starts at most one."
        ) from None


def claimed_attempt(reg, trigger_key: str) -> int:
    import sqlalchemy as sa

    from champion.audit import retrain_runs

    c = retrain_runs.c
    with reg.audit.engine.begin() as conn:
        row = conn.execute(sa.select(c.id, c.outcome).where(c.trigger_key == trigger_key)).first()
        if row is None or row.outcome is not None:
            raise ChampionError(f"--claimed: no open retrain attempt holds trigger '{trigger_key}'.")
        conn.execute(retrain_runs.update().where(c.id == row.id).values(pid=os.getpid()))
    return int(row.id)


def finish_attempt(reg, attempt: int, outcome: str, version: str | None, detail: str) -> None:
    """Record the outcome. A `skipped` attempt trained nothing, so it gives its trigger key back (renamed
    with the attempt's id): the same trigger may start a retrain once there are enough fresh labels."""
    import sqlalchemy as sa

    from champion.audit import retrain_runs

    values = {
        "ended_at": datetime.now(UTC),
        "outcome": outcome,
        "challenger_version": version,
        "detail": detail[:4000],
    }
    c = retrain_runs.c
    with reg.audit.engine.begin() as conn:
        if outcome == "skipped":
            key = conn.execute(sa.select(c.trigger_key).where(c.id == attempt)).scalar() or ""
            values["trigger_key"] = f"{key[:200]}#skipped-{attempt}"
        conn.execute(retrain_runs.update().where(c.id == attempt).values(**values))


class AlreadyClaimed(ChampionError):
    """The trigger key was used already: the retrain it asks for has been started before."""


def load_retrain_config(path: str | None, overrides: list[str] | None = None, name: str | None = None):
    from champion.config import load_config

    if path:
        cfg = load_config(RetrainConfig, path, overrides)
    else:
        cfg = parse_config(RetrainConfig, apply_overrides({}, list(overrides or [])), "--set")
    if name is not None:
        cfg.model_name = name
    return cfg
