"""Retrain a text-generation champion on fresh labelled conversations, then let the generative gate decide.

Reads top to bottom: the champion's recipe (its run's config.yaml) and the rows it was trained on (its
source re-split, checked against its data hash, plus the rows its own retrain added, kept in its run) ->
fresh conversations: corrected answers people sent (`/feedback` `correction`, a JSON answer) teach the
retrain only, while the rows of labelled files are dealt by a keyed hash of the message into fresh-train or
the holdout -> `sft` goes on training the champion's adapter on its rows plus the fresh ones (new intents
included) -> `pipelines.lm_gate.compare_generation` on the holdout and the safety suite -> the same hand-over
as a classifier's retrain (none, approval, the canary, or champion), every step audited under one trigger key.
Run it with `champion retrain NAME --config configs/lm_retrain.yaml`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from champion.config import StrictModel
from champion.errors import ChampionError
from pipelines.lm_gate import LMGateConfig
from pipelines.retrain import RetrainResult, Triggers

if TYPE_CHECKING:
    import pandas as pd

EXTRA_REPLIES_ARTIFACT = "lineage/extra_replies.jsonl"  # the reply rows a retrain added, in its run
EXTRA_REPLIES_TAG = "retrain.extra_rows_sha256"
CANDIDATE = "candidate"


class LMFreshConfig(StrictModel):
    feedback: bool = True  # corrected answers in the inference log: training rows only, never the holdout
    log_url: str | None = None  # default: the serving default (CHAMPION_INFERENCE_LOG_URL, else sqlite)
    files: list[str] = Field(default_factory=list)  # labelled conversations (support-replies tables)
    holdout_share: float = Field(0.3, gt=0, lt=1)  # of the files' distinct messages, kept for the gate
    seed: int | None = None  # null: the split is keyed by this CHAMPION_HOME's secret, as for classifiers
    min_train_rows: int = Field(20, ge=0)  # fresh rows a retrain needs to learn from
    repeat: int = Field(1, ge=1, le=20)  # how often each fresh row appears in the training split


class LMRetrainConfig(StrictModel):
    model_name: str = Field("support-replies", min_length=1)
    init: Literal["champion", "base"] = "champion"  # go on training the champion's adapter, or a new one
    overrides: list[str] = Field(
        default_factory=list
    )  # on the champion's recorded config, e.g. train.epochs=1
    fresh: LMFreshConfig = LMFreshConfig()
    gate: LMGateConfig = LMGateConfig()
    promotion: Literal["direct", "canary", "none"] = "direct"
    approval: Literal["none", "required"] = "none"
    approval_hours: float = Field(72.0, gt=0, le=24 * 90)
    experiment: str = "champion-retrain"
    triggers: Triggers = Triggers()


def load_any_retrain_config(reg, name: str, path: str | None, overrides: list[str] | None = None):
    """The retrain config of `name` (given, it is set as the model's name): an `LMRetrainConfig` for a
    text-generation model (its champion's task, else its newest version's), else a classifier's."""
    from champion.config import apply_overrides, load_config, parse_config
    from champion.registry import CHAMPION, TASK_TAG, TEXT_GENERATION, served_version
    from pipelines.retrain import load_retrain_config

    version = served_version(reg, name, CHAMPION)
    if version is None:
        found = reg.client.search_model_versions(f"name = '{name}'")
        version = str(max(int(v.version) for v in found)) if found else None
    generative = version is not None and (
        reg.client.get_model_version(name, version).tags.get(TASK_TAG) == TEXT_GENERATION
    )
    if not generative:
        return load_retrain_config(path, overrides, name=name)
    if path:
        cfg = load_config(LMRetrainConfig, path, overrides)
    else:
        cfg = parse_config(LMRetrainConfig, apply_overrides({}, list(overrides or [])), "--set")
    cfg.model_name = name
    return cfg


def retrain_lm(
    cfg: LMRetrainConfig,
    registry=None,
    *,
    trigger: str = "manual",
    trigger_key: str | None = None,
    about: dict[str, Any] | None = None,
    claimed: bool = False,
) -> RetrainResult:
    """One retrain attempt of a text-generation model, recorded under `trigger_key` as a classifier's is."""
    from champion.registry import connect, registered_model
    from pipelines.retrain import run_attempt

    reg = registry or connect()
    name = cfg.model_name
    registered_model(reg, name)
    for i, path in enumerate(cfg.fresh.files):
        if not os.path.isfile(path):
            raise ChampionError(
                f"fresh.files[{i}]: '{path}' does not exist; list support-replies tables (CSV, JSONL or "
                "Parquet)."
            )
    return run_attempt(reg, name, trigger, trigger_key, about, claimed,
                       lambda key: _retrain_lm(cfg, reg, trigger, key, about or {}))  # fmt: skip


def _retrain_lm(cfg: LMRetrainConfig, reg, trigger: str, trigger_key: str, about: dict[str, Any]):
    import pandas as pd

    from champion.registry import CHAMPION, served_version
    from pipelines.fresh import normalise
    from pipelines.lm_gate import compare_generation, conversations_sha256
    from pipelines.retrain import gate_summary, hand_over, record_event, tag_gate
    from pipelines.sft import sft

    name = cfg.model_name
    champion = served_version(reg, name, CHAMPION)
    if champion is None:
        raise ChampionError(f"model '{name}' has no champion to retrain; promote a version first.")

    # The champion's recipe and its rows, exactly as recorded.
    sft_cfg, splits, learnt = champion_recipe_lm(reg, name, champion, cfg)
    init_adapter = (
        _champion_adapter(reg, name, champion, sft_cfg.model.base) if cfg.init == "champion" else None
    )

    # Fresh conversations: corrected answers teach; the files' rows are dealt to fresh-train or the holdout.
    known = {normalise(t) for t in splits.train["instruction"]}
    feedback = corrected_conversations(name, cfg.fresh.log_url) if cfg.fresh.feedback else _empty()
    files_train, holdout = _dealt_files(cfg.fresh, name)
    holdout = _keep(holdout, [normalise(t) not in known for t in holdout["instruction"]])
    fresh = pd.concat([feedback, files_train], ignore_index=True).drop_duplicates("instruction", keep="last")
    held = {normalise(t) for t in holdout["instruction"]}
    fresh = _keep(fresh, [normalise(t) not in held for t in fresh["instruction"]])
    counts = {"fresh_feedback_rows": len(feedback), "fresh_file_train_rows": len(files_train),
              "fresh_train_rows": len(fresh), "fresh_holdout_rows": len(holdout),
              "champion_fresh_rows_kept": len(learnt)}  # fmt: skip
    if len(holdout) < cfg.gate.gate.min_rows:  # checked before training: without a holdout nothing is judged
        return RetrainResult(
            "skipped",
            f"the fresh holdout has {len(holdout)} labelled conversations, fewer than the gate's min_rows "
            f"({cfg.gate.gate.min_rows}); add labelled conversation files to fresh.files (corrected answers "
            "teach a retrain but never judge it); nothing was trained.",
            champion,
            counts=counts,
        )
    if len(fresh) < cfg.fresh.min_train_rows:
        return RetrainResult(
            "skipped",
            f"{len(fresh)} fresh labelled conversations to learn from, fewer than fresh.min_train_rows "
            f"({cfg.fresh.min_train_rows}); nothing was trained.",
            champion,
            counts=counts,
        )

    # Train: the champion's rows (with what it learnt from fresh rows before) plus the new ones.
    replaced = {normalise(t) for t in fresh["instruction"]}
    kept = _keep(learnt, [normalise(t) not in replaced for t in learnt["instruction"]])
    extra = pd.concat([kept, *[fresh] * cfg.fresh.repeat], ignore_index=True)
    lines = extra_rows_text(extra)
    lineage = {
        "retrain.parent_version": champion,
        "retrain.trigger": trigger,
        "retrain.trigger_key": trigger_key[:250],
        "retrain.init": cfg.init,
        "retrain.fresh_train_rows": str(len(fresh)),
        "retrain.fresh_holdout_rows": str(len(holdout)),
        "retrain.fresh_holdout_sha256": conversations_sha256(holdout) if len(holdout) else "",
        "retrain.kept_rows": str(len(kept)),
        EXTRA_REPLIES_TAG: hashlib.sha256(lines.encode()).hexdigest(),
        **{f"retrain.{k}": str(v)[:250] for k, v in about.items()},
    }
    trained = sft(
        sft_cfg,
        registry=reg,
        extra_train=extra,
        init_adapter=init_adapter,
        tags=lineage,
        reason=f"retrained from v{champion} ({trigger}) on {len(fresh)} fresh conversations",
        texts={EXTRA_REPLIES_ARTIFACT: lines},
    )
    version = trained.version
    counts["challenger_intents_new"] = sorted(set(fresh["intent"]) - set(splits.train["intent"]))

    # The gate, against the champion of this moment, on the holdout and the safety suite.
    now_champion = served_version(reg, name, CHAMPION)
    if now_champion is None:
        raise ChampionError(f"model '{name}' lost its champion while the retrain ran; nothing was promoted.")
    comparison = compare_generation(
        reg, name, now_champion, version, holdout, cfg.gate, trigger=trigger, trigger_key=trigger_key,
        parent_version=champion,
    )  # fmt: skip
    decision = comparison.decision
    tag_gate(reg, name, version, decision)
    record_event(reg, name, "gate", f"gate on v{version} against v{now_champion}: {decision.reason}", version,
                 decision.evidence, trigger_key)  # fmt: skip
    if not decision.promote:
        return RetrainResult("refused", f"v{version} {decision.reason}", now_champion, version, decision,
                             trained.run_id, counts)  # fmt: skip
    evidence = {"gate": gate_summary(decision), "trigger_key": trigger_key}
    return hand_over(reg, name, version, now_champion, decision, evidence, cfg.promotion, cfg.approval,
                     cfg.approval_hours, trigger, trained.run_id, counts)  # fmt: skip


def champion_recipe_lm(reg, name: str, version: str, cfg: LMRetrainConfig):
    """(the version's SFT config with the retrain's changes, its splits as it was trained on them, the fresh
    rows its own retrain added): its source re-split plus those rows must give its recorded data hash."""
    import mlflow
    import yaml

    from champion.config import apply_overrides, parse_config
    from pipelines.sft import SFTConfig, load_reply_splits, with_extra_rows

    mv = reg.client.get_model_version(name, version)
    try:
        data = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{mv.run_id}/config.yaml")) or {}
    except Exception:
        raise ChampionError(
            f"v{version} of '{name}' has no recorded config.yaml in its run (registered outside Champion?); "
            "retrain needs its recipe, so fine-tune one with `champion sft` instead."
        ) from None
    recorded = parse_config(SFTConfig, data, source=f"v{version}'s recorded config")
    data.setdefault("registry", {}).update(
        {"model_name": name, "alias": CANDIDATE, "experiment": cfg.experiment, "tracking_uri": None}
    )
    sft_cfg = parse_config(
        SFTConfig, apply_overrides(data, list(cfg.overrides)), source="the retrain's overrides"
    )
    if sft_cfg.data != recorded.data:
        raise ChampionError(
            f"overrides: data.* changes the rows v{version} was trained on, which retrain reuses as "
            "recorded; drop the data override."
        )
    splits = load_reply_splits(recorded.data)
    learnt = _empty()
    if mv.tags.get(EXTRA_REPLIES_TAG):
        text = mlflow.artifacts.load_text(f"runs:/{mv.run_id}/{EXTRA_REPLIES_ARTIFACT}")
        if hashlib.sha256(text.encode()).hexdigest() != mv.tags[EXTRA_REPLIES_TAG]:
            raise ChampionError(
                f"{EXTRA_REPLIES_ARTIFACT} in run {mv.run_id} changed since v{version} was trained on it; "
                "restore it from a backup, or retrain from a version whose rows are intact."
            )
        learnt = _rows_of(text)
        splits = with_extra_rows(splits, learnt)
    if splits.sha256 != mv.tags.get("data_sha256"):
        raise ChampionError(
            f"v{version} of '{name}' was trained on other rows than its recorded data gives now (data_sha256 "
            f"{mv.tags.get('data_sha256', '?')[:12]}…, now {splits.sha256[:12]}…); restore its data file."
        )
    return sft_cfg, splits, learnt.drop_duplicates("instruction").reset_index(drop=True)


def corrected_conversations(name: str, log_url: str | None = None) -> pd.DataFrame:
    """The logged answers of `name` that someone corrected with a whole JSON answer, as reply rows: the last
    user message, and the intent, category, first entity and reply of the correction (the latest one)."""
    from champion.config import default_log_url
    from serving.inference_log import InferenceLog

    log = InferenceLog(log_url or default_log_url())
    try:
        frame = log.read(name, generated=True)
    finally:
        log.engine.dispose()
    rows = []
    for text, correction in zip(frame.get("text", []), frame.get("correction", []), strict=True):
        row = reply_row(text, correction)
        if row is not None:
            rows.append(row)
    return _frame(rows)


def reply_row(conversation: str, correction: Any) -> dict[str, str] | None:
    """A reply row from a logged conversation (messages JSON) and a correction, or None when the correction is
    not a JSON answer with an intent, a category and a reply."""
    from pipelines.chat import parse_answer

    if not isinstance(correction, str) or not correction.strip():
        return None
    answer = parse_answer(correction)
    if answer is None or not all(
        isinstance(answer.get(k), str) and answer[k] for k in ("intent", "category")
    ):
        return None
    if not isinstance(answer.get("reply"), str):
        return None
    try:
        messages = json.loads(conversation)
        message = next(m["content"] for m in reversed(messages) if m.get("role") == "user")
    except (ValueError, StopIteration, TypeError, KeyError):
        return None
    entities = answer.get("entities") if isinstance(answer.get("entities"), dict) else {}
    kind, value = next(iter(entities.items()), ("", ""))
    return {"instruction": str(message), "intent": answer["intent"], "category": answer["category"],
            "entity_type": str(kind), "entity_value": str(value), "response": answer["reply"]}  # fmt: skip


def extra_rows_text(rows: pd.DataFrame) -> str:
    columns = ["instruction", "intent", "category", "entity_type", "entity_value", "response"]
    return "".join(json.dumps([str(r[c]) for c in columns], ensure_ascii=False) + "\n"
                   for r in rows.to_dict("records"))  # fmt: skip


def _rows_of(text: str) -> pd.DataFrame:
    columns = ["instruction", "intent", "category", "entity_type", "entity_value", "response"]
    return _frame([dict(zip(columns, json.loads(line), strict=True)) for line in text.splitlines() if line])


def _frame(rows: list[dict]) -> pd.DataFrame:
    import pandas as pd

    columns = ["instruction", "intent", "category", "entity_type", "entity_value", "response"]
    return pd.DataFrame(rows, columns=columns)


def _keep(rows: pd.DataFrame, mask: list[bool]) -> pd.DataFrame:
    """The rows where `mask` is true (an empty mask keeps the columns of an empty table)."""
    import numpy as np

    return rows.loc[np.asarray(mask, dtype=bool)].reset_index(drop=True)


def _empty() -> pd.DataFrame:
    return _frame([])


def _dealt_files(fresh: LMFreshConfig, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The files' rows on the fresh-train side and on the holdout side of the keyed hash."""
    import pandas as pd

    from pipelines.chat import load_reply_rows
    from pipelines.fresh import holdout_secret, holdout_side

    if not fresh.files:
        return _empty(), _empty()
    rows = pd.concat([load_reply_rows(path) for path in fresh.files], ignore_index=True)
    rows = rows[list(_empty().columns)].astype(str)
    seed = holdout_secret() if fresh.seed is None else fresh.seed
    side = holdout_side(list(rows["instruction"]), name, fresh.holdout_share, seed)
    return rows[~side].reset_index(drop=True), rows[side].reset_index(drop=True)


def _champion_adapter(reg, name: str, version: str, base: str):
    """The champion's adapter folder, checked as the service checks it, to go on training on `base` (the
    recipe's base, which must be the one the adapter was trained on)."""
    from champion.registry import BASE_SHA_TAG, TEXT_GENERATION
    from champion.safety import files_digest
    from pipelines.lm import resolve_base
    from serving.model import checked_folder

    folder, fmt, mv = checked_folder(reg.client, name, str(version), task=TEXT_GENERATION)
    if fmt != "lora":
        raise ChampionError(
            f"init: v{version} of '{name}' is a merged model (format {fmt}), not an adapter to go on "
            "training; set init: base to train a new adapter on its base."
        )
    if files_digest(resolve_base(base)) != mv.tags.get(BASE_SHA_TAG):
        raise ChampionError(
            f"model.base: '{base}' is not the base v{version}'s adapter was trained on (its sha256 differs "
            f"from the tag {BASE_SHA_TAG}); restore that base, or set init: base."
        )
    return folder
