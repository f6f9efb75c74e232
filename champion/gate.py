"""The champion/challenger gate: promote only a challenger that is better on the same fresh labelled rows.

`decide_gate` is a pure function of three aligned arrays (true labels, the champion's and the challenger's
predictions on the same rows) and a `GateConfig`. It answers with `promote`, one sentence of `reason`
and all of its `evidence`: both models' accuracy and macro-F1, the paired bootstrap interval of each
difference (rows are resampled jointly, so both models are always scored on the same draw), McNemar's exact
test on the rows where exactly one model is right, and the per-class F1 changes. The rule:

1. the holdout has at least `min_rows` rows, else refuse (too little evidence to promote anything);
2. the lower end of the interval of the macro-F1 difference (challenger - champion) clears `margin`;
3. no class with at least `min_class_rows` holdout rows loses more than `max_class_drop` of its F1 while
   its own paired interval (Bonferroni-corrected over those classes) lies below zero: a sure loss. With
   ten or twenty rows a class's F1 moves by more than 0.1 by chance, so a point estimate alone would veto
   good challengers at random;
4. optionally (`mcnemar_alpha`), McNemar's test on accuracy is significant in the challenger's favour.

Macro-F1 is taken over the classes of the holdout's true labels, the same set for both models: a class the
champion cannot predict (a new intent) counts as 0 for it, which is what a user of it would get.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from champion.config import StrictModel


class GateConfig(StrictModel):
    margin: float = Field(0.0, ge=-1, le=1)  # the macro-F1 gain the interval's lower end must clear
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of the two-sided paired bootstrap interval
    resamples: int = Field(2000, ge=200)
    min_rows: int = Field(200, ge=10)  # fresh holdout rows needed for any verdict
    min_class_rows: int = Field(10, ge=1)  # classes with fewer holdout rows are listed, not floor-checked
    max_class_drop: float = Field(0.10, ge=0, le=1)  # the most F1 any (large enough) class may lose
    mcnemar_alpha: float | None = Field(None, gt=0, lt=1)  # also require McNemar p below this, if set
    seed: int = 0


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str  # one sentence
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason, "evidence": self.evidence}


def decide_gate(
    y_true,
    champion_pred,
    challenger_pred,
    cfg: GateConfig | None = None,
    champion_labels=None,
    **about: Any,
) -> GateDecision:
    """Compare two models' predictions on the same labelled rows. `champion_labels` (the champion's label
    set) names the holdout's classes it cannot predict; `about` (e.g. the holdout's sha256, the versions)
    is copied into the evidence."""
    cfg = cfg or GateConfig()
    y = np.asarray(y_true, dtype=object).astype(str)
    a = np.asarray(champion_pred, dtype=object).astype(str)
    b = np.asarray(challenger_pred, dtype=object).astype(str)
    if not len(y) == len(a) == len(b):
        raise ValueError(f"the gate needs aligned rows: {len(y)} labels, {len(a)} and {len(b)} predictions")
    n = len(y)
    evidence: dict[str, Any] = {**about, "rows": n, "config": cfg.model_dump(mode="json")}
    if n < cfg.min_rows:
        return GateDecision(
            False,
            f"the fresh holdout has {n} labelled rows, fewer than the {cfg.min_rows} the gate needs to "
            "judge; collect more feedback labels (or lower gate.min_rows).",
            evidence,
        )

    classes = sorted(set(y))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    t = np.array([index[c] for c in y])
    pa = np.array([index.get(c, -1) for c in a])  # -1: a label outside the holdout's classes
    pb = np.array([index.get(c, -1) for c in b])

    support = np.bincount(t, minlength=k)  # holdout rows per class
    full = np.ones((1, n))
    (class_a,), present = _class_f1(full, t, pa, k)
    (class_b,), _ = _class_f1(full, t, pb, k)
    fa, fb = _macro_f1(class_a[None], present), _macro_f1(class_b[None], present)
    acc_a, acc_b = float(np.mean(a == y)), float(np.mean(b == y))
    ok_diff = (b == y).astype(float) - (a == y).astype(float)
    boot_f1, boot_acc, boot_class = [], [], []
    for counts in paired_draws(n, cfg.resamples, cfg.seed):  # the same draws of rows for both models
        draw_a, drawn = _class_f1(counts, t, pa, k)
        draw_b, _ = _class_f1(counts, t, pb, k)
        boot_f1.append(_macro_f1(draw_b, drawn) - _macro_f1(draw_a, drawn))
        boot_class.append(np.where(drawn, draw_b - draw_a, np.nan))
        boot_acc.append(counts @ ok_diff / n)
    boot_f1, boot_acc, boot_class = map(np.concatenate, (boot_f1, boot_acc, boot_class))
    tail = (1 - cfg.confidence) / 2
    f1_ci = [float(np.quantile(boot_f1, tail)), float(np.quantile(boot_f1, 1 - tail))]
    acc_ci = [float(np.quantile(boot_acc, tail)), float(np.quantile(boot_acc, 1 - tail))]
    only_a = int(np.sum((a == y) & (b != y)))
    only_b = int(np.sum((b == y) & (a != y)))
    p_value = _mcnemar_exact(only_a, only_b)

    # A class blocks promotion when it lost more than the allowed F1 and surely lost (its interval lies
    # below zero): with a few rows per class, a point estimate alone would veto good challengers by chance.
    # The per-class intervals share the error budget over the judged classes (Bonferroni): with 60 classes
    # at 95% each, some class would "surely" lose by chance in most holdouts.
    n_judged = max(1, int(np.sum(support >= cfg.min_class_rows)))
    per_class = _per_class_changes(classes, support, class_a, class_b, boot_class, tail / n_judged)
    judged = {c: v for c, v in per_class.items() if v["rows"] >= cfg.min_class_rows}
    fallen = {c: v for c, v in judged.items() if -v["change"] > cfg.max_class_drop and v["interval"][1] < 0}
    worst = min(fallen.items(), key=lambda kv: kv[1]["change"], default=None)
    evidence.update(
        champion={"accuracy": acc_a, "macro_f1": float(fa[0])},
        challenger={"accuracy": acc_b, "macro_f1": float(fb[0])},
        macro_f1_delta=float(fb[0] - fa[0]),
        macro_f1_delta_interval=f1_ci,
        accuracy_delta=acc_b - acc_a,
        accuracy_delta_interval=acc_ci,
        probability_not_better=float(np.mean(boot_f1 <= 0)),
        mcnemar={"champion_only_right": only_a, "challenger_only_right": only_b, "p_value": p_value},
        per_class=per_class,
        classes=k,
        class_interval_confidence=1 - 2 * tail / n_judged,
        classes_too_small=sorted(c for c, v in per_class.items() if v["rows"] < cfg.min_class_rows),
        new_classes=None if champion_labels is None else sorted(set(classes) - set(champion_labels)),
    )
    pct = f"{cfg.confidence:.0%}"
    delta = (
        f"macro-F1 {fb[0]:.3f} against the champion's {fa[0]:.3f} on {n} fresh holdout rows "
        f"(difference {fb[0] - fa[0]:+.3f}, {pct} paired interval {f1_ci[0]:+.3f} to {f1_ci[1]:+.3f})"
    )
    if f1_ci[0] <= cfg.margin:
        return GateDecision(
            False,
            f"refused: the challenger's {delta} is not surely better than the margin {cfg.margin:+.3f}.",
            evidence,
        )
    if worst is not None:
        c, v = worst
        return GateDecision(
            False,
            f"refused: class '{c}' loses {-v['change']:.3f} of F1 ({v['champion']:.3f} -> "
            f"{v['challenger']:.3f} on {v['rows']} rows, interval {v['interval'][0]:+.3f} to "
            f"{v['interval'][1]:+.3f}), more than the allowed {cfg.max_class_drop:.3f}, although the "
            f"challenger's {delta}.",
            evidence,
        )
    if cfg.mcnemar_alpha is not None and not (only_b > only_a and p_value < cfg.mcnemar_alpha):
        return GateDecision(
            False,
            f"refused: McNemar's test does not favour the challenger (p={p_value:.3g}, right only by the "
            f"challenger on {only_b} rows, only by the champion on {only_a}), although its {delta}.",
            evidence,
        )
    return GateDecision(True, f"passed: the challenger's {delta} clears the margin.", evidence)


def paired_draws(n: int, resamples: int, seed: int, cells: int = 4_000_000):
    """Blocks of bootstrap draws as counts: row r of a block says how often each holdout row was drawn in
    one resample (n rows with replacement). Blocks hold at most `cells` numbers, so memory stays bounded."""
    rng = np.random.default_rng(seed)
    block = max(1, cells // max(n, 1))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)


def _class_f1(weights: np.ndarray, t: np.ndarray, p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(F1 of each of the k true classes, whether the class occurs) under each row of weights (one
    resample per row); predictions outside the classes (-1) count only as misses."""
    n = len(t)
    true_onehot = np.zeros((n, k))
    true_onehot[np.arange(n), t] = 1.0
    pred_onehot = np.zeros((n, k))
    known = p >= 0
    pred_onehot[np.arange(n)[known], p[known]] = 1.0
    tp = weights @ (true_onehot * pred_onehot)
    support = weights @ true_onehot  # tp + fn
    denom = support + weights @ pred_onehot  # + tp + fp
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1, support > 0


def _macro_f1(f1: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Macro average over the classes that occur in each resample."""
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


def _per_class_changes(
    classes: list[str], support, f_a, f_b, boot: np.ndarray, tail: float
) -> dict[str, dict]:
    """Each class's rows, both F1s on the holdout, the change and its paired interval from `boot`."""
    low, high = np.nanquantile(boot, tail, axis=0), np.nanquantile(boot, 1 - tail, axis=0)
    return {
        c: {"rows": int(support[i]), "champion": float(f_a[i]), "challenger": float(f_b[i]),
            "change": float(f_b[i] - f_a[i]), "interval": [float(low[i]), float(high[i])]}
        for i, c in enumerate(classes)
    }  # fmt: skip


def _mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: the binomial test on the discordant pairs."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(min(b, c), b + c, 0.5).pvalue)


# --- variants of one model: a distilled student, an int8 or ONNX copy ------------------------------------


class VariantBudget(StrictModel):
    """How much quality a cheaper variant may give up against its source, on the same held-out rows."""

    min_f1_ratio: float = Field(0.97, gt=0, le=1)  # a student: macro-F1 at least this share of the source's
    min_agreement: float = Field(0.99, gt=0, le=1)  # int8 / ONNX: share of rows given the source's label
    min_rows: int = Field(200, ge=1)  # held-out rows needed for any verdict


def decide_variant(kind: str, measured: dict[str, Any], budget: VariantBudget | None = None) -> GateDecision:
    """Is a variant (`kind`: student, int8, onnx, onnx-int8) within its quality budget of its source?

    `measured` holds `rows`, `agreement` (share of identical labels) and `source`/`variant` dicts with
    `macro_f1` and `accuracy`, all on the same held-out rows. A student is judged on its macro-F1 ratio
    (it is trained to generalise, not to copy every label); a compressed copy on its label agreement.
    """
    budget = budget or VariantBudget()
    n = int(measured["rows"])
    source_f1, variant_f1 = measured["source"]["macro_f1"], measured["variant"]["macro_f1"]
    ratio = variant_f1 / source_f1 if source_f1 > 0 else 0.0
    evidence = {**measured, "kind": kind, "f1_ratio": ratio, "budget": budget.model_dump(mode="json")}
    if n < budget.min_rows:
        return GateDecision(
            False,
            f"only {n} held-out rows were scored, fewer than the {budget.min_rows} the variant gate needs; "
            "pass --data with more labelled rows (or lower budget.min_rows).",
            evidence,
        )
    if kind == "student":
        ok = ratio >= budget.min_f1_ratio
        verdict = (
            f"the {kind} keeps {ratio:.1%} of its source's macro-F1 ({variant_f1:.4f} against "
            f"{source_f1:.4f} on {n} held-out rows), {'within' if ok else 'outside'} the budget of "
            f"{budget.min_f1_ratio:.0%}."
        )
    else:
        agreement = float(measured["agreement"])
        ok = agreement >= budget.min_agreement
        verdict = (
            f"the {kind} variant gives its source's label on {agreement:.2%} of {n} held-out rows, "
            f"{'within' if ok else 'outside'} the budget of {budget.min_agreement:.0%} "
            f"(macro-F1 {variant_f1:.4f} against {source_f1:.4f})."
        )
    return GateDecision(ok, verdict[0].upper() + verdict[1:], evidence)
