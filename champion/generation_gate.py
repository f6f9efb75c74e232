"""The champion/challenger gate for a generative model: the same fresh labelled conversations, paired.

`decide_generation_gate` is a pure function of two per-row score tables (what each model's answer got right
on the same rows, in the same order: `pipelines.generation_eval.per_row` writes them), the rows' slice labels
(their true intents) and, optionally, both models' results on the safety suite. It answers with the same
`GateDecision` as the classifier gate: `promote`, one sentence of `reason` and its `evidence`. The rule:

1. the holdout has at least `min_rows` rows, else refuse;
2. no safety case the champion passes is failed by the challenger (a regression is refused whatever the
   metric says: a model that follows an injected instruction is not promoted for being a little more
   accurate);
3. the lower end of the paired bootstrap interval of the primary metric's difference (challenger -
   champion) clears `margin`; rows are resampled jointly, so both answers to a message are always in the
   same draw;
4. no slice (intent) with at least `min_slice_rows` rows surely loses more than `max_slice_drop` of the
   metric (its own paired interval, Bonferroni-corrected over the judged slices, lies below zero);
5. the challenger meets every absolute floor in `floors` (e.g. `valid_json: 0.95`).

The primary metric is one of `METRICS` or `weighted` (a weighted mean of several). Entity F1 is micro: its
true and false positives are summed under each draw, not averaged per row. No judge is needed: every
metric is computed from the parsed answer and the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from champion.config import StrictModel
from champion.gate import GateDecision, paired_draws

# metric -> the per-row column it averages (entity_f1 is computed from the tp/fp/fn columns)
_MEAN_COLUMNS = {
    "intent_accuracy": "intent_correct",
    "category_accuracy": "category_correct",
    "exact_match": "exact_match",
    "valid_json": "valid_json",
    "reply_rouge_l": "reply_rouge_l",
    "reply_similarity": "reply_similarity",
}
METRICS = (*_MEAN_COLUMNS, "entity_f1")


class GenerationGateConfig(StrictModel):
    metric: Literal[
        "intent_accuracy",
        "category_accuracy",
        "exact_match",
        "entity_f1",
        "valid_json",
        "reply_rouge_l",
        "reply_similarity",
        "weighted",
    ] = "intent_accuracy"
    weights: dict[str, float] = Field(default_factory=dict)  # metric -> weight, when metric is "weighted"
    margin: float = Field(0.0, ge=-1, le=1)  # the gain the interval's lower end must clear
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of the two-sided paired bootstrap interval
    resamples: int = Field(2000, ge=200)
    min_rows: int = Field(100, ge=10)  # fresh labelled conversations needed for any verdict
    min_slice_rows: int = Field(10, ge=1)  # intents with fewer rows are listed, not floor-checked
    max_slice_drop: float = Field(0.10, ge=0, le=1)  # the most any (large enough) intent may lose
    floors: dict[str, float] = Field(default_factory=dict)  # metric -> the challenger's minimum
    safety: bool = True  # refuse a challenger that fails a safety case the champion passes
    seed: int = 0

    @model_validator(mode="after")
    def _known_metrics(self) -> GenerationGateConfig:
        for where, names in (("weights", self.weights), ("floors", self.floors)):
            unknown = sorted(set(names) - set(METRICS))
            if unknown:
                raise ValueError(
                    f"gate.{where}: '{unknown[0]}' is not a metric; use one of {', '.join(METRICS)}."
                )
        if self.metric == "weighted" and not any(w > 0 for w in self.weights.values()):
            raise ValueError(
                "gate.weights: metric 'weighted' needs at least one positive weight, e.g. "
                "{intent_accuracy: 0.7, entity_f1: 0.3}."
            )
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("gate.weights: weights must be 0 or more; drop the negative one.")
        return self

    def used_metrics(self) -> list[str]:
        """The metrics the primary metric is made of."""
        if self.metric != "weighted":
            return [self.metric]
        return [m for m in METRICS if self.weights.get(m, 0) > 0]


def metric_under(table: Mapping[str, Any], metric: str, counts: np.ndarray) -> np.ndarray:
    """`metric` of the rows of `table` under each row of `counts` (how often each row was drawn)."""
    total = counts.sum(axis=1)
    total = np.where(total > 0, total, 1.0)
    if metric == "entity_f1":
        tp, fp, fn = (counts @ _column(table, c) for c in ("entity_tp", "entity_fp", "entity_fn"))
        denom = 2 * tp + fp + fn
        return np.divide(2 * tp, denom, out=np.ones_like(tp), where=denom > 0)  # no entity anywhere: 1.0
    return counts @ _column(table, _MEAN_COLUMNS[metric]) / total


def primary_under(table: Mapping[str, Any], cfg: GenerationGateConfig, counts: np.ndarray) -> np.ndarray:
    """The configured primary metric under each row of `counts`."""
    if cfg.metric != "weighted":
        return metric_under(table, cfg.metric, counts)
    used = cfg.used_metrics()
    weight = sum(cfg.weights[m] for m in used)
    return sum(cfg.weights[m] * metric_under(table, m, counts) for m in used) / weight


def safety_regressions(champion: Mapping[str, bool], challenger: Mapping[str, bool]) -> list[str]:
    """The safety cases the champion passes and the challenger fails, in case order."""
    return [case for case, passed in champion.items() if passed and not challenger.get(case, False)]


def decide_generation_gate(
    champion_rows: Mapping[str, Any],
    challenger_rows: Mapping[str, Any],
    slices: Sequence[str],
    cfg: GenerationGateConfig | None = None,
    safety: Mapping[str, Mapping[str, bool]] | None = None,
    **about: Any,
) -> GateDecision:
    """Judge two models' answers to the same labelled rows. `slices`: each row's true intent; `safety`:
    {"champion": {case: passed}, "challenger": {case: passed}}; `about` is copied into the evidence."""
    cfg = cfg or GenerationGateConfig()
    groups = np.asarray(slices, dtype=object).astype(str)
    n = len(groups)
    if not n == len(_column(champion_rows, "valid_json")) == len(_column(challenger_rows, "valid_json")):
        raise ValueError(
            "the generative gate needs aligned rows: one champion and one challenger answer per row."
        )
    evidence: dict[str, Any] = {
        **about,
        "rows": n,
        "metric": cfg.metric,
        "config": cfg.model_dump(mode="json"),
    }
    if n < cfg.min_rows:
        return GateDecision(
            False,
            f"the fresh holdout has {n} labelled conversations, fewer than the {cfg.min_rows} the gate needs "
            "to judge; collect more reviewed answers (or lower gate.min_rows).",
            evidence,
        )
    full = np.ones((1, n))
    both = {"champion": champion_rows, "challenger": challenger_rows}
    evidence.update(
        {
            side: {m: float(metric_under(t, m, full)[0]) for m in METRICS if _has(t, m)}
            for side, t in both.items()
        }
    )
    point_a = float(primary_under(champion_rows, cfg, full)[0])
    point_b = float(primary_under(challenger_rows, cfg, full)[0])

    names = sorted(set(groups))
    masks = np.stack([groups == g for g in names]).astype(float)  # slices x rows
    boot, boot_slice = [], []
    for counts in paired_draws(n, cfg.resamples, cfg.seed):  # the same draws of rows for both models
        boot.append(primary_under(challenger_rows, cfg, counts) - primary_under(champion_rows, cfg, counts))
        per = []
        for mask in masks:
            drawn = counts * mask
            present = drawn.sum(axis=1) > 0
            diff = primary_under(challenger_rows, cfg, drawn) - primary_under(champion_rows, cfg, drawn)
            per.append(np.where(present, diff, np.nan))
        boot_slice.append(np.stack(per, axis=1))
    boot_all, boot_slices = np.concatenate(boot), np.concatenate(boot_slice)
    tail = (1 - cfg.confidence) / 2
    interval = [float(np.quantile(boot_all, tail)), float(np.quantile(boot_all, 1 - tail))]
    support = masks.sum(axis=1).astype(int)
    n_judged = max(1, int(np.sum(support >= cfg.min_slice_rows)))
    per_slice = {}
    for i, g in enumerate(names):
        a = float(primary_under(champion_rows, cfg, masks[i][None])[0])
        b = float(primary_under(challenger_rows, cfg, masks[i][None])[0])
        low = float(np.nanquantile(boot_slices[:, i], tail / n_judged))
        high = float(np.nanquantile(boot_slices[:, i], 1 - tail / n_judged))
        per_slice[g] = {"rows": int(support[i]), "champion": a, "challenger": b, "change": b - a,
                        "interval": [low, high]}  # fmt: skip
    judged = {g: v for g, v in per_slice.items() if v["rows"] >= cfg.min_slice_rows}
    fallen = {g: v for g, v in judged.items() if -v["change"] > cfg.max_slice_drop and v["interval"][1] < 0}
    worst = min(fallen.items(), key=lambda kv: kv[1]["change"], default=None)
    below = {
        m: (float(evidence["challenger"][m]), floor)
        for m, floor in cfg.floors.items()
        if m in evidence["challenger"] and evidence["challenger"][m] < floor
    }
    regressions = safety_regressions(safety["champion"], safety["challenger"]) if safety else []
    evidence.update(
        primary={"champion": point_a, "challenger": point_b},
        delta=point_b - point_a,
        delta_interval=interval,
        probability_not_better=float(np.mean(boot_all <= 0)),
        per_slice=per_slice,
        slice_interval_confidence=1 - 2 * tail / n_judged,
        slices_too_small=sorted(g for g, v in per_slice.items() if v["rows"] < cfg.min_slice_rows),
        safety=None
        if safety is None
        else {**{k: dict(v) for k, v in safety.items()}, "regressions": regressions},
    )
    delta = (
        f"{cfg.metric} {point_b:.3f} against the champion's {point_a:.3f} on {n} fresh labelled "
        f"conversations (difference {point_b - point_a:+.3f}, {cfg.confidence:.0%} paired interval "
        f"{interval[0]:+.3f} to {interval[1]:+.3f})"
    )
    if cfg.safety and regressions:
        shown = ", ".join(regressions[:5]) + (
            f" and {len(regressions) - 5} more" if len(regressions) > 5 else ""
        )
        return GateDecision(
            False,
            f"refused: the challenger fails {len(regressions)} safety case(s) the champion passes ({shown}), "
            f"whatever its {delta}.",
            evidence,
        )
    if interval[0] <= cfg.margin:
        return GateDecision(
            False,
            f"refused: the challenger's {delta} is not surely better than the margin {cfg.margin:+.3f}.",
            evidence,
        )
    if worst is not None:
        g, v = worst
        return GateDecision(
            False,
            f"refused: intent '{g}' loses {-v['change']:.3f} of {cfg.metric} ({v['champion']:.3f} -> "
            f"{v['challenger']:.3f} on {v['rows']} rows, interval {v['interval'][0]:+.3f} to "
            f"{v['interval'][1]:+.3f}), more than the allowed {cfg.max_slice_drop:.3f}, although the "
            f"challenger's {delta}.",
            evidence,
        )
    if below:
        m, (got, floor) = next(iter(below.items()))
        return GateDecision(
            False,
            f"refused: the challenger's {m} is {got:.3f}, under its floor {floor:.3f} (gate.floors), "
            f"although its {delta}.",
            evidence,
        )
    return GateDecision(True, f"passed: the challenger's {delta} clears the margin.", evidence)


def _column(table: Mapping[str, Any], name: str) -> np.ndarray:
    if name not in table:
        raise ValueError(
            f"the score table has no '{name}' column; score the answers with "
            "pipelines.generation_eval.per_row"
            + (" and an embedder (reply_similarity)" if name == "reply_similarity" else "")
            + "."
        )
    return np.asarray(table[name], dtype=float)


def _has(table: Mapping[str, Any], metric: str) -> bool:
    needed = ("entity_tp", "entity_fp", "entity_fn") if metric == "entity_f1" else (_MEAN_COLUMNS[metric],)
    return all(c in table for c in needed)
