"""Drift of a text-generation model's traffic: its prompts, its answers, its own confidence and its feedback.

The same `champion drift` verb, decision, store and alarm as for a classifier; the checks differ. Each is
calibrated on the version's reference for the window's size (the two-sample bootstrap of
`monitoring.stats`), never below its effect-size floor, and splits the false-alarm budget with the others:

- `prompt_length`, `answer_length`: the prompt's and the answer's token counts (normed Wasserstein);
- `intent_mix`: the mix of intents the JSON answers name, "" for an answer without one (Jensen-Shannon);
- `valid_json`: the drop in the share of answers that are a JSON object (a performance signal);
- `answer_logprob`: the drop in the mean log-probability the model gave its own answers' tokens: label-free,
  it falls when the model meets what it is unsure of (a performance signal);
- `concept`: intent accuracy on the answers people judged (a correction's intent is the truth; a rating of 1
  without one says the answer was right, -1 that it was wrong), with a bootstrap interval, against the
  reference's held-out intent accuracy.

The reference is the version's held-out messages (the `generation.reference` table `champion sft` logs with
their true answers) answered again through the serving engine, greedily, with the version's system prompt and
`max_new_tokens`: the window and the reference are measured the same way. It is built once per version and
kept under CHAMPION_HOME.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from champion.errors import ChampionError
from monitoring import stats
from monitoring.drift import (
    DRIFT,
    INSUFFICIENT,
    NOT_COMPUTABLE,
    OK,
    CheckResult,
    DriftDecision,
    overall_status,
)
from serving.lm_server import first_json_object

if TYPE_CHECKING:
    import pandas as pd

    from monitoring.config import MonitorConfig

LM_CHECKS = ("prompt_length", "answer_length", "intent_mix", "valid_json", "answer_logprob")
FEATURES = ("prompt_tokens", "completion_tokens", "valid_json", "intent", "logprob")
_ENDED = ("stop", "length")  # a cancelled or failed answer is partial: its features are not the model's


@dataclass
class LMReference:
    rows: pd.DataFrame  # FEATURES + true_intent, one row per held-out message
    meta: dict[str, Any] = field(default_factory=dict)
    nulls: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def intent_accuracy(self) -> float:
        return float((self.rows["intent"] == self.rows["true_intent"]).mean())


def answer_features(answers) -> tuple[np.ndarray, np.ndarray]:
    """(is a JSON object, the intent it names or "") for each answer."""
    parsed = [first_json_object(str(a)) for a in answers]
    valid = np.array([p is not None for p in parsed], dtype=bool)
    intents = np.array(
        [str(p["intent"]) if p is not None and isinstance(p.get("intent"), str) else "" for p in parsed],
        dtype=object,
    )
    return valid, intents


def window_features(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The features of logged answers (`InferenceLog.read(..., generated=True)`), and how many rows were left
    out because the answer did not end by itself (cancelled by its client, or failed)."""
    import pandas as pd

    ended = frame["label"].isin(_ENDED).to_numpy() if len(frame) else np.zeros(0, bool)
    kept = frame[ended]
    valid, intents = answer_features(kept["output"].fillna("").tolist())
    truth = [
        _judged(answer_intent, correction, rating)
        for answer_intent, correction, rating in zip(
            intents,
            kept.get("correction", [None] * len(kept)),
            kept.get("rating", [None] * len(kept)),
            strict=True,
        )
    ]
    features = pd.DataFrame(
        {
            "prompt_tokens": kept["prompt_tokens"].fillna(0).to_numpy(dtype=np.float64),
            "completion_tokens": kept["completion_tokens"].fillna(0).to_numpy(dtype=np.float64),
            "valid_json": valid,
            "intent": intents,
            "logprob": kept["score"].to_numpy(dtype=np.float64),
            "true_intent": np.array(truth, dtype=object),
        }
    )
    return features, int((~ended).sum())


def _judged(answer_intent: str, correction: Any, rating: Any) -> str | None:
    """The true intent a person's feedback gives, or None: a correction's intent; else a rating of 1 (the
    answer was right) or -1 (it was wrong: a label that matches no intent)."""
    if isinstance(correction, str) and correction.strip():
        parsed = first_json_object(correction)
        if parsed is not None and isinstance(parsed.get("intent"), str):
            return parsed["intent"]
    import pandas as pd

    if rating is not None and not pd.isna(rating):
        if int(rating) == 1:
            return answer_intent
        if int(rating) == -1:
            return "\x00wrong"  # never equal to an intent an answer names
    return None


# --- the reference ----------------------------------------------------------------------------------------


def build_lm_reference(
    lm, messages: list[str], true_intents: list[str], meta: dict | None = None
) -> LMReference:
    """Answer `messages` with `lm` (a serving `LoadedLM`) through the serving engine, greedily, and keep
    each answer's features beside its true intent."""
    import pandas as pd

    from serving.generation import Engine, GenerationRequest
    from serving.lm_server import render_prompt

    if not messages:
        raise ChampionError("the generation reference needs held-out messages; none were given.")
    limit = int(lm.generation.get("max_new_tokens", 96))
    engine = Engine(lm.model, lm.tokenizer, lm.version, max_batch=16, context=lm.active)
    try:
        streams = [
            engine.submit(
                GenerationRequest(
                    render_prompt(lm, [{"role": "user", "content": m}]), max_tokens=limit, temperature=0.0
                )
            )
            for m in messages
        ]
        finishes = [s.result(600) for s in streams]
    finally:
        engine.close(timeout=5.0)
    valid, intents = answer_features([f.text for f in finishes])
    rows = pd.DataFrame(
        {
            "prompt_tokens": np.array([f.prompt_tokens for f in finishes], dtype=np.float64),
            "completion_tokens": np.array([f.completion_tokens for f in finishes], dtype=np.float64),
            "valid_json": valid,
            "intent": intents,
            "logprob": np.array([f.mean_logprob or 0.0 for f in finishes], dtype=np.float64),
            "true_intent": np.array(true_intents, dtype=object),
        }
    )
    return LMReference(rows, {"rows": len(rows), "max_new_tokens": limit, **(meta or {})})


def load_lm_reference(reg, name: str, version: str, cache: Path | None = None) -> LMReference:
    """The reference of text-generation version `version`, built from its `generation.reference` table on
    first use and cached under CHAMPION_HOME (keyed by that table's URI)."""
    import mlflow
    import pandas as pd

    from champion.config import champion_home
    from serving.lm_model import load_generative_version

    tags = reg.client.get_model_version(name, str(version)).tags
    uri = tags.get("generation.reference")
    if not uri:
        raise ChampionError(
            f"version {version} of '{name}' has no generation.reference tag (its held-out answers); register "
            "it again with `champion sft`, which logs them."
        )
    folder = (cache or champion_home() / "cache" / "lm-reference") / name / str(version)
    stamp, table = folder / "source.txt", folder / "rows.parquet"
    if stamp.exists() and stamp.read_text() == uri and table.exists():
        return LMReference(pd.read_parquet(table), json.loads((folder / "meta.json").read_text()))
    try:
        held_out = mlflow.artifacts.load_dict(uri)
    except Exception as err:
        raise ChampionError(
            f"the held-out answers of '{name}' v{version} ({uri}) could not be read ({err}); register the "
            "version again with `champion sft`."
        ) from None
    frame = pd.DataFrame(held_out["data"], columns=held_out["columns"])
    truth = [str((first_json_object(str(r)) or {}).get("intent", "")) for r in frame["reference"]]
    lm = load_generative_version(reg.client, name, str(version))
    ref = build_lm_reference(
        lm, [str(m) for m in frame["message"]], truth, {"model": name, "version": str(version)}
    )
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    ref.rows.to_parquet(table, index=False)
    (folder / "meta.json").write_text(json.dumps(ref.meta))
    stamp.write_text(uri)
    return ref


# --- the checks -------------------------------------------------------------------------------------------


def check_generation_drift(
    window: pd.DataFrame,
    ref: LMReference,
    cfg: MonitorConfig,
    model: str = "",
    version: str = "",
    **about: Any,
) -> DriftDecision:
    """Every enabled check of `cfg.generation` on `window` (`window_features`) against `ref`."""
    checks = cfg.generation
    enabled = [name for name in LM_CHECKS if getattr(checks, name).enabled]
    level = cfg.calibration.false_alarm_rate / max(1, len(enabled))
    results = [_CHECKS[name](window, ref, cfg, getattr(checks, name), level) for name in enabled]
    if cfg.checks.concept.enabled:
        results.append(_concept(window, ref, cfg))
    status = overall_status(results)
    info = {
        "false_alarm_rate": cfg.calibration.false_alarm_rate,
        "level_per_check": level,
        "task": "text-generation",
        **about,
    }
    return DriftDecision(status, model, str(version), len(window), results, info)


def _null(ref: LMReference, name: str, null_fn, n: int, cfg: MonitorConfig) -> np.ndarray:
    size = min(n, cfg.calibration.max_window_rows)
    m, resamples, seed = len(ref), cfg.calibration.resamples, cfg.calibration.seed
    key = (name, size, m, resamples, seed)
    if key not in ref.nulls:
        ref.nulls[key] = np.concatenate(
            [null_fn(w, r) for w, r in stats.count_draws(m, size, resamples, seed)]
        )
    return ref.nulls[key]


def _judge(name, statistic, value, null, floor, level, n, what, details) -> CheckResult:
    threshold, quantile = stats.upper_threshold(null, level, floor)
    drifted = bool(value > threshold)
    verb = "above" if drifted else "within"
    details = {**details, "null_quantile": quantile, "null_windows": int(null.size), "floor": floor}
    reason = f"{name}: {what} {value:.4g} is {verb} its calibrated threshold {threshold:.4g} ({n} rows)."
    return CheckResult(
        name, statistic, value, threshold, drifted, n, DRIFT if drifted else OK, reason, details
    )


def _too_few(name: str, statistic: str, n: int, needed: int) -> CheckResult:
    return CheckResult(
        name,
        statistic,
        None,
        None,
        False,
        n,
        INSUFFICIENT,
        f"{name}: {n} answers in the window, fewer than the {needed} it needs for a verdict.",
    )


def _length(column: str, name: str):
    def check(window, ref: LMReference, cfg, check, level) -> CheckResult:
        n = len(window)
        if n < check.min_rows:
            return _too_few(name, "wasserstein_normed", n, check.min_rows)
        ref_values = ref.rows[column].to_numpy(dtype=np.float64)
        scale = max(float(np.std(ref_values)), 1e-3)
        cur = window[column].to_numpy(dtype=np.float64)
        value = stats.normed_wasserstein(cur, ref_values, scale)
        null = _null(ref, name, lambda w, r: stats.wasserstein_rows(ref_values, w, r) / scale, n, cfg)
        details = {"window_mean": float(cur.mean()), "reference_mean": float(ref_values.mean())}
        what = f"the {column.replace('_', ' ')}' normed Wasserstein distance"
        return _judge(name, "wasserstein_normed", value, null, check.floor, level, n, what, details)

    return check


def _intent_mix(window, ref: LMReference, cfg, check, level) -> CheckResult:
    name = "intent_mix"
    n = len(window)
    if n < check.min_rows:
        return _too_few(name, "js_distance", n, check.min_rows)
    order = sorted(set(ref.rows["intent"]) | set(window["intent"]))
    codes = {intent: i for i, intent in enumerate(order)}
    ref_codes = np.array([codes[i] for i in ref.rows["intent"]])
    cur = stats.label_counts(window["intent"].to_numpy(), order)[:-1]  # `order` holds every intent
    value = stats.js_distance(cur, stats.label_counts(ref.rows["intent"].to_numpy(), order)[:-1])
    onehot = np.eye(len(order))[ref_codes]
    null = _null(ref, name, lambda w, r: stats.js_distance_rows(w @ onehot, r @ onehot), n, cfg)
    top = sorted(zip(order, cur / max(cur.sum(), 1), strict=True), key=lambda kv: -kv[1])[:5]
    details = {"window_top_intents": {k or "(none)": round(float(v), 4) for k, v in top}}
    return _judge(
        name, "js_distance", value, null, check.floor, level, n, "the intent mix's JS distance", details
    )


def _drop(column: str, name: str, statistic: str, what: str):
    def check(window, ref: LMReference, cfg, check, level) -> CheckResult:
        n = len(window)
        if n < check.min_rows:
            return _too_few(name, statistic, n, check.min_rows)
        ref_values = ref.rows[column].to_numpy(dtype=np.float64)
        cur = window[column].to_numpy(dtype=np.float64)
        value = float(ref_values.mean() - cur.mean())
        null = _null(ref, name, lambda w, r: r @ ref_values / r.sum(1) - w @ ref_values / w.sum(1), n, cfg)
        details = {"window_mean": float(cur.mean()), "reference_mean": float(ref_values.mean())}
        return _judge(name, statistic, value, null, check.floor, level, n, what, details)

    return check


def _concept(window, ref: LMReference, cfg: MonitorConfig) -> CheckResult:
    """Intent accuracy on the judged answers, with a bootstrap interval, against the held-out figure."""
    check = cfg.checks.concept
    name, statistic = "concept", "judged_intent_accuracy"
    judged = window["true_intent"].notna().to_numpy() if len(window) else np.zeros(0, bool)
    n = int(judged.sum())
    if n < check.min_labels:
        result = CheckResult(
            name,
            statistic,
            None,
            None,
            False,
            n,
            INSUFFICIENT,
            f"{name}: {n} judged answers in the window, fewer than the {check.min_labels} it "
            "needs for a verdict.",
            {"labelled": n},
        )
        return result
    if not len(ref):
        return CheckResult(
            name, statistic, None, None, False, n, NOT_COMPUTABLE, f"{name}: no reference rows."
        )
    y_true = window["true_intent"].to_numpy()[judged].astype(str)
    y_pred = window["intent"].to_numpy()[judged].astype(str)
    held = ref.intent_accuracy
    acc = float((y_true == y_pred).mean())
    low, high = stats.bootstrap_interval(
        y_true, y_pred, "accuracy", check.resamples, check.confidence, cfg.calibration.seed
    )
    drifted = bool(high < held - check.margin)
    reason = (
        f"{name}: on {n} answers people judged, intent accuracy is {acc:.3f} "
        f"({check.confidence:.0%} interval {low:.3f}-{high:.3f}) against {held:.3f} held out"
        + ("; the interval lies below it, so the model has got worse." if drifted else ".")
    )
    details = {
        "labelled": n,
        "accuracy": acc,
        "accuracy_interval": [low, high],
        "held_out_accuracy": held,
        "margin": check.margin,
    }
    return CheckResult(
        name, statistic, acc, held - check.margin, drifted, n, DRIFT if drifted else OK, reason, details
    )


_CHECKS = {
    "prompt_length": _length("prompt_tokens", "prompt_length"),
    "answer_length": _length("completion_tokens", "answer_length"),
    "intent_mix": _intent_mix,
    "valid_json": _drop(
        "valid_json", "valid_json", "valid_json_drop", "the drop in the share of JSON answers"
    ),
    "answer_logprob": _drop(
        "logprob",
        "answer_logprob",
        "mean_logprob_drop",
        "the drop in the answers' mean token log-probability",
    ),
}
